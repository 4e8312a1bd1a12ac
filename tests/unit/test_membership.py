"""mesh.membership: every transition of the pure membership state machine, with explicit `now`.

The directory membership reads is a real (pure) mesh.directory.Directory; records reach it the way
they do in a worker, by merging another owner's writes."""

from __future__ import annotations

from mesh.directory import Directory, Owner
from mesh.membership import (
    Connect,
    Disconnect,
    DropKeys,
    Hello,
    MemberRow,
    Membership,
    Rejoin,
    parse_hello,
    seed_link,
)

ME = Owner("a", 0)
SIBLING = Owner("a", 1)  # same node: dead_after
REMOTE = Owner("b", 0)  # other node: node_dead_after
OTHER = Owner("b", 1)
SIB_IPC = "ipc:///run/mesh-1.ipc"
B0_TCP = "tcp://10.0.0.2:4000"
B1_TCP = "tcp://10.0.0.2:4001"
KEY = bytes(range(32))


def membership(*, heartbeat: float = 0.5, dead_after: float = 3.0, busy_grace: float = 30.0,
               forget_after: float = 40.0) -> Membership:
    return Membership(ME, 100, heartbeat=heartbeat, dead_after=dead_after, node_dead_after=10.0,
                      busy_grace=busy_grace, forget_after=forget_after)


def directory() -> Directory:
    return Directory(ME, 100)


def holding_keys(dir_: Directory, owner: Owner, incarnation: int) -> Directory:
    """`dir_` after merging a record of `owner`'s (as a repair from anyone would bring it)."""
    theirs = Directory(owner, incarnation)
    dir_.merge(theirs.local_add(KEY, 1))
    return dir_


def hello(sender: Owner, incarnation: int, *, tcp: str = "", ipc: str = "", region: int = 0,
          members: tuple[MemberRow, ...] = (), dead: tuple[tuple[Owner, int], ...] = ()) -> Hello:
    return Hello(sender, incarnation, ipc=ipc, tcp=tcp, region=region, members=members, dead=dead)


def ticks(m: Membership, start: float, end: float, dir_: Directory, *, step: float = 0.5) -> None:
    t = start
    while t <= end:
        m.tick(t, dir_)
        t += step


# -- join ---------------------------------------------------------------------------------------


def test_a_configured_member_is_connected_at_once_and_up_once_heard() -> None:
    m = membership()
    assert m.add(SIBLING, SIB_IPC, 0.0, ipc=SIB_IPC)
    assert m.take_effects() == [Connect(SIBLING, SIB_IPC)]
    assert not m.members[SIBLING].alive and m.member_rows("", "", 0) == [["a", 0, "", "", 0]]
    assert m.heard(SIBLING, 7, 0.2) is m.members[SIBLING]
    assert m.members[SIBLING].alive and m.members[SIBLING].incarnation == 7
    assert ["a", 1, SIB_IPC, "", 0] in m.member_rows("", "", 0)
    assert m.local_alive() == {SIBLING}


def test_ourselves_and_known_members_are_not_added_twice() -> None:
    m = membership()
    assert not m.add(ME, SIB_IPC, 0.0)
    assert m.add(SIBLING, SIB_IPC, 0.0)
    assert not m.add(SIBLING, "ipc:///elsewhere", 1.0)
    assert m.take_effects() == [Connect(SIBLING, SIB_IPC)]


def test_a_heartbeat_from_an_unknown_member_makes_it_a_member_reached_over_tcp() -> None:
    m = membership()
    member = m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, ipc="ipc:///their/mesh-0.ipc", region=902), 1.0)
    assert member is not None and member.alive and member.endpoint == B0_TCP and member.region == 902
    assert m.take_effects() == [Connect(REMOTE, B0_TCP)]


def test_members_listed_alive_by_another_are_learned_but_not_up() -> None:
    m = membership()
    rows = (MemberRow(REMOTE, "", B0_TCP, 902), MemberRow(OTHER, "", B1_TCP, 902), MemberRow(ME, "", "x", 0))
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, members=rows), 1.0)
    assert m.take_effects() == [Connect(REMOTE, B0_TCP), Connect(OTHER, B1_TCP)]
    learned = m.members[OTHER]
    assert learned.learned and not learned.alive and not learned.ever_heard
    assert set(m.heartbeat_links()) == {REMOTE, OTHER}


def test_a_member_without_a_usable_endpoint_is_not_added() -> None:
    m = membership()
    assert m.on_heartbeat(hello(REMOTE, 5, ipc="ipc:///their/mesh-0.ipc"), 1.0) is None  # ipc is node-local
    assert m.members == {} and m.take_effects() == []


def test_a_seed_gets_heartbeats_until_the_member_behind_it_is_alive() -> None:
    m = membership()
    m.add_seed(B0_TCP)
    assert m.take_effects() == [Connect(seed_link(B0_TCP), B0_TCP)]
    assert list(m.heartbeat_links()) == [seed_link(B0_TCP)]
    m.add(REMOTE, B0_TCP, 0.0, tcp=B0_TCP)
    assert set(m.heartbeat_links()) == {REMOTE, seed_link(B0_TCP)}  # known by name, not heard yet
    m.heard(REMOTE, 5, 0.5)
    assert list(m.heartbeat_links()) == [REMOTE]


# -- heartbeats keep alive, silence kills ---------------------------------------------------------


def test_heartbeats_keep_a_member_alive_and_silence_kills_it_after_the_node_limit() -> None:
    m, d = membership(), directory()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 0.0)
    m.take_effects()
    for t in range(1, 60):
        m.heard(REMOTE, 5, float(t))
        m.tick(t + 0.25, d)
    assert m.members[REMOTE].alive and m.take_effects() == [] and m.deaths == 0
    ticks(m, 59.5, 69.0, d)  # silent for exactly the limit: still alive
    assert m.members[REMOTE].alive
    m.tick(69.01, d)
    assert not m.members[REMOTE].alive and m.deaths == 1
    assert m.take_effects() == [DropKeys(REMOTE, 5)]
    assert m.dead_rows() == [["b", 0, 5]]
    ticks(m, 69.5, 80.0, d)
    assert m.take_effects() == [] and m.deaths == 1  # declared once


def test_a_sibling_on_our_node_dies_after_the_shorter_limit() -> None:
    m, d = membership(), directory()
    m.add(SIBLING, SIB_IPC, 0.0, ipc=SIB_IPC)
    m.heard(SIBLING, 7, 0.0)
    m.take_effects()
    ticks(m, 0.5, 3.0, d)
    assert m.members[SIBLING].alive
    m.tick(3.01, d)
    assert m.take_effects() == [DropKeys(SIBLING, 7)]


def test_pulses_keep_a_silent_loop_busy_until_the_grace_runs_out() -> None:
    m, d = membership(dead_after=3.0, busy_grace=10.0), directory()
    m.add(SIBLING, SIB_IPC, 0.0, ipc=SIB_IPC)
    m.heard(SIBLING, 7, 0.0)
    m.take_effects()
    t = 0.5
    while t <= 13.0:
        assert m.on_pulse(SIBLING, 7, int(t * 1000), t)
        m.tick(t, d)
        t += 0.5
    assert m.members[SIBLING].alive and m.members[SIBLING].busy and m.take_effects() == []
    m.on_pulse(SIBLING, 7, 13_500, 13.5)
    m.tick(13.5, d)  # loop silent for more than limit + grace: wedged, dead although it pulses
    assert m.take_effects() == [DropKeys(SIBLING, 7)] and not m.members[SIBLING].busy


def test_a_pulse_counts_only_for_the_incarnation_we_know() -> None:
    m = membership()
    m.add(SIBLING, SIB_IPC, 0.0)
    assert not m.on_pulse(SIBLING, 7, 0, 0.1)  # not heard yet: joins are the heartbeats' business
    m.heard(SIBLING, 7, 0.2)
    assert not m.on_pulse(SIBLING, 8, 0, 0.3)
    assert not m.on_pulse(OTHER, 1, 0, 0.3)
    assert m.on_pulse(SIBLING, 7, 250, 0.4) and m.members[SIBLING].pulse_silent_ms == 250


def test_a_member_never_heard_whose_incarnation_is_unknown_leaves_no_dead_mark() -> None:
    m, d = membership(), directory()
    m.add(SIBLING, SIB_IPC, 0.0)
    m.take_effects()
    m.tick(10.0, d)
    assert m.take_effects() == [] and m.dead_marks == {}


def test_our_own_stall_gives_everyone_a_fresh_grace_period() -> None:
    m, d = membership(), directory()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 0.0)
    m.take_effects()
    m.tick(0.5, d)
    m.tick(30.0, d)  # our loop was away for 29.5 s: nobody is judged by it
    assert m.members[REMOTE].alive and m.take_effects() == []
    ticks(m, 30.5, 40.0, d)
    assert m.members[REMOTE].alive
    m.tick(40.01, d)
    assert m.take_effects() == [DropKeys(REMOTE, 5)]


# -- restarts, rejoins, dead incarnations ---------------------------------------------------------


def test_a_restart_with_a_new_incarnation_drops_the_old_ones_keys() -> None:
    m = membership()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 0.0)
    m.take_effects()
    member = m.on_heartbeat(hello(REMOTE, 9, tcp=B0_TCP), 1.0)
    assert member is not None and member.incarnation == 9 and member.alive
    assert m.take_effects() == [DropKeys(REMOTE, 5)]
    assert m.dead_marks == {}  # the new incarnation is welcome; the directory remembers the old one
    assert m.heard(REMOTE, 5, 1.5) is None  # a late message of the old one


def test_a_dead_incarnation_is_ignored_until_it_rejoins_as_a_new_one() -> None:
    m, d = membership(), directory()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 0.0)
    m.tick(10.5, d)
    assert m.take_effects() == [Connect(REMOTE, B0_TCP), DropKeys(REMOTE, 5)]
    assert m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 11.0) is None
    assert not m.on_pulse(REMOTE, 5, 0, 11.0)
    assert not m.members[REMOTE].alive and m.dead_rows() == [["b", 0, 5]]
    member = m.on_heartbeat(hello(REMOTE, 6, tcp=B0_TCP), 12.0)
    assert member is not None and member.alive and m.dead_rows() == []
    assert m.take_effects() == []  # 5 was dropped already


def test_a_forgotten_member_learned_again_stays_dead_until_it_rejoins() -> None:
    m, d = membership(forget_after=40.0), directory()
    holding_keys(d, OTHER, 3)
    listing = (MemberRow(OTHER, "", B1_TCP, 902),)
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, members=listing), 0.0)
    m.take_effects()
    for t in range(1, 11):
        m.heard(REMOTE, 5, float(t))
    m.tick(10.5, d)  # OTHER never spoke: dead, with the incarnation its records carry
    assert m.take_effects() == [DropKeys(OTHER, 3)]
    ticks(m, 11.0, 40.5, d)
    assert OTHER not in m.members and Disconnect(OTHER) in m.take_effects()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, members=listing), 41.0)  # learned again, fresh state
    assert m.members[OTHER].incarnation == 0 and m.take_effects() == [Connect(OTHER, B1_TCP)]
    assert m.heard(OTHER, 3, 41.5) is None and ["b", 1, 3] in m.dead_rows()
    assert m.heard(OTHER, 4, 42.0) is not None


def test_a_heartbeat_saying_we_are_dead_makes_us_rejoin_once() -> None:
    m = membership()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, dead=((ME, 99),)), 0.0)  # an older incarnation of ours
    assert Rejoin("b/0 declared us dead") not in m.take_effects()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, dead=((ME, 100), (ME, 100))), 1.0)
    assert m.take_effects() == [Rejoin("b/0 declared us dead")]
    m.incarnation = 101  # what the shell does after moving our keys to the new incarnation
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, dead=((ME, 100),)), 2.0)
    assert m.take_effects() == []


def test_a_member_that_moved_is_followed_to_its_new_endpoint() -> None:
    m = membership()
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, region=902), 0.0)
    m.take_effects()
    m.on_heartbeat(hello(REMOTE, 6, tcp="tcp://10.0.0.9:4000", region=903), 1.0)
    effects = m.take_effects()
    assert effects[0] == Connect(REMOTE, "tcp://10.0.0.9:4000") and DropKeys(REMOTE, 5) in effects
    assert m.members[REMOTE].region == 903
    m.on_delta(REMOTE, 6, 2.0, endpoints=("", "tcp://10.0.0.9:4001"))
    assert m.take_effects() == [Connect(REMOTE, "tcp://10.0.0.9:4001")]
    m.on_delta(REMOTE, 6, 3.0)  # a delta that does not say where it listens: nothing to follow
    assert m.take_effects() == [] and m.members[REMOTE].last_heard == 3.0


# -- heard of only through others ---------------------------------------------------------------


def test_keys_of_an_owner_heard_of_only_through_others_leave_after_its_limit() -> None:
    m, d = membership(), holding_keys(directory(), OTHER, 3)
    m.tick(0.0, d)
    ticks(m, 0.5, 10.0, d)
    assert m.take_effects() == []
    m.tick(10.5, d)
    assert m.take_effects() == [DropKeys(OTHER, 3)] and m.dead_rows() == [["b", 1, 3]]
    assert not m.members  # it has no endpoint we know: our heartbeats cannot reach it yet
    d.mark_dead(OTHER, 3)  # what the shell does with DropKeys
    m.tick(11.0, d)
    assert m.rumoured == {} and m.take_effects() == []


def test_an_owner_heard_of_through_others_that_speaks_in_time_is_a_member() -> None:
    m, d = membership(), holding_keys(directory(), OTHER, 3)
    ticks(m, 0.0, 8.5, d)
    assert OTHER in m.rumoured
    m.on_heartbeat(hello(OTHER, 3, tcp=B1_TCP), 9.0)
    assert m.take_effects() == [Connect(OTHER, B1_TCP)]
    ticks(m, 9.0, 18.5, d)
    assert m.take_effects() == [] and m.rumoured == {} and m.members[OTHER].alive


def test_a_rumoured_owner_declared_dead_hears_it_from_us_when_it_turns_up() -> None:
    m, d = membership(), holding_keys(directory(), OTHER, 3)
    ticks(m, 0.0, 10.5, d)
    assert m.take_effects() == [DropKeys(OTHER, 3)]
    assert m.on_heartbeat(hello(OTHER, 3, tcp=B1_TCP), 11.0) is None  # its keys stay refused...
    assert m.take_effects() == [Connect(OTHER, B1_TCP)] and OTHER in set(m.heartbeat_links())
    assert ["b", 1, 3] in m.dead_rows()  # ...and our heartbeats to it say so, so it rejoins


def test_rumoured_owners_of_our_own_node_get_the_shorter_limit() -> None:
    m, d = membership(), holding_keys(directory(), SIBLING, 2)
    ticks(m, 0.0, 3.0, d)
    assert m.take_effects() == []
    m.tick(3.01, d)
    assert m.take_effects() == [DropKeys(SIBLING, 2)]


# -- bounds -------------------------------------------------------------------------------------


def test_membership_is_bounded_and_refusals_are_counted() -> None:
    m = Membership(ME, 100, max_members=3)
    rows = tuple(MemberRow(Owner("c", i), "", f"tcp://10.0.0.3:{5000 + i}", 0) for i in range(10))
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, members=rows), 0.0)
    assert len(m.members) == 3 and m.members_refused == 8
    assert m.on_heartbeat(hello(OTHER, 1, tcp=B1_TCP), 1.0) is None and m.members_refused == 9


def test_a_learned_member_never_heard_is_forgotten_but_a_heard_one_is_kept() -> None:
    m, d = membership(forget_after=40.0), directory()
    rows = (MemberRow(OTHER, "", B1_TCP, 0), MemberRow(Owner("c", 0), "", "tcp://10.0.0.3:1", 0))
    m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP, members=rows), 0.0)
    m.heard(Owner("c", 0), 1, 0.5)
    m.take_effects()
    m.tick(40.0, d)
    assert OTHER in m.members
    m.tick(40.01, d)
    assert OTHER not in m.members and Owner("c", 0) in m.members and m.members_forgotten == 1
    assert Disconnect(OTHER) in m.take_effects()


def test_repairs_with_a_member_are_at_most_one_per_heartbeat() -> None:
    m = membership(heartbeat=0.5)
    member = m.on_heartbeat(hello(REMOTE, 5, tcp=B0_TCP), 0.0)
    assert member is not None
    assert m.repair_due(member, 1.0)
    assert not m.repair_due(member, 1.4)
    assert m.repair_due(member, 1.5)


# -- parsing ------------------------------------------------------------------------------------


def test_parse_hello_keeps_the_well_formed_rows_only() -> None:
    body = {"ipc": 3, "tcp": B0_TCP, "region": "x",
            "members": [["b", 1, "", B1_TCP, 902], ["b", "1", "", B1_TCP, 902], ["b", 1], "junk"],
            "dead": [["a", 0, 100], ["a", 0], ["a", 0, "100"]]}
    assert parse_hello(REMOTE, 5, body) == Hello(REMOTE, 5, ipc="", tcp=B0_TCP, region=0,
                                                 members=(MemberRow(OTHER, "", B1_TCP, 902),), dead=((ME, 100),))

    assert parse_hello(REMOTE, 5, {}) == Hello(REMOTE, 5)

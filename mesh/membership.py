"""Mesh membership as a pure state machine: who the members are, which are alive, who is dead.

No sockets, no clock, no asyncio (like aioquic's connection.py): every input carries `now`, and
what membership decides comes back as return values and as effects queued for `take_effects()`,
which the I/O shell (mesh.worker_mesh) carries out in order:

- `Connect(link, endpoint)`: open a link to a member or seed (or move it to a new endpoint);
- `Disconnect(link)`: a member was forgotten;
- `DropKeys(owner, incarnation)`: that incarnation (and older) of the owner is dead; its keys
  leave the directory;
- `Rejoin(why)`: another member declared us dead (a healed partition); take a new incarnation.

Inputs: `on_heartbeat` (a parsed `Hello`), `on_delta`, `on_repair` and `on_pulse` (a member's
loop, or its liveness thread, spoke), and `tick` (once per heartbeat interval, with a read-only
view of the directory to learn which owners hold keys). The transitions, all judged by `now`:

- join: a member is known once configured (`add`), heard (`on_heartbeat`), or named alive in a
  heartbeat's member list (learned); a member is up once one of its loop messages arrives;
- alive, busy, dead: a member silent for its limit (`dead_after` within our node,
  `node_dead_after` across nodes) is dead unless its liveness thread still pulses, which keeps
  it busy for up to `busy_grace` more (mesh.liveness.verdict);
- restart: a loop message with a greater incarnation drops the previous incarnation's keys;
  messages of an incarnation declared dead are ignored until it rejoins;
- heard of only through others: an owner whose keys reached the directory in others' gossip
  before it was a member gets the same limit, and its keys leave if it stays silent;
- bounds: at most `max_members`; a member learned from a list and never heard is forgotten after
  `forget_after`; our own loop stalling gives everyone a fresh grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .directory import Owner
from .liveness import BUSY, DEAD, verdict

log = logging.getLogger("mesh.worker")

#: a tick this much later than the heartbeat interval (or 1 s) means our own loop stalled
STALL_FACTOR = 4


@dataclass
class Member:
    owner: Owner
    endpoint: str
    region: int = 0
    ipc: str = ""
    tcp: str = ""
    incarnation: int = 0
    last_heard: float = 0.0
    alive: bool = False
    last_repair: float = 0.0
    ever_heard: bool = False
    last_pulse: float = 0.0  # from its liveness thread (mesh.liveness)
    pulse_silent_ms: int = 0  # how long its loop had been silent, as its last pulse said
    busy: bool = False  # its loop is silent but its process pulses: keys kept (see tick)
    learned: bool = False  # known only from another member's list (not configured, not heard)


@dataclass(frozen=True)
class MemberRow:
    """A member as a heartbeat lists it."""

    owner: Owner
    ipc: str
    tcp: str
    region: int


@dataclass(frozen=True)
class Hello:
    """A heartbeat, parsed: who sent it, where it listens, whom it knows alive and dead."""

    sender: Owner
    incarnation: int
    ipc: str = ""
    tcp: str = ""
    region: int = 0
    members: tuple[MemberRow, ...] = ()
    dead: tuple[tuple[Owner, int], ...] = ()


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_hello(sender: Owner, incarnation: int, body: dict[str, Any]) -> Hello:
    """The membership fields of a heartbeat body; malformed rows are skipped, not fatal."""
    region = body.get("region")
    members = []
    for row in body.get("members", ()):
        if isinstance(row, list) and len(row) == 5:
            node, worker, ipc, tcp, m_region = row
            if isinstance(node, str) and isinstance(worker, int) and isinstance(ipc, str) \
                    and isinstance(tcp, str) and isinstance(m_region, int):
                members.append(MemberRow(Owner(node, worker), ipc, tcp, m_region))
    dead = []
    for row in body.get("dead", ()):
        if isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], int) \
                and isinstance(row[2], int):
            dead.append((Owner(row[0], row[1]), row[2]))
    return Hello(sender, incarnation, _str(body.get("ipc")), _str(body.get("tcp")),
                 region if isinstance(region, int) else 0, tuple(members), tuple(dead))


@dataclass(frozen=True)
class Connect:
    link: Hashable  # an Owner, or ("seed", endpoint)
    endpoint: str


@dataclass(frozen=True)
class Disconnect:
    link: Hashable


@dataclass(frozen=True)
class DropKeys:
    owner: Owner
    incarnation: int


@dataclass(frozen=True)
class Rejoin:
    why: str


Effect = Connect | Disconnect | DropKeys | Rejoin


class DirectoryView(Protocol):
    """What membership reads of the key directory (mesh.directory.Directory)."""

    def owners(self) -> list[Owner]: ...

    def known_incarnation(self, owner: Owner) -> int | None: ...


def seed_link(endpoint: str) -> tuple[str, str]:
    return ("seed", endpoint)


@dataclass
class Membership:
    me: Owner
    incarnation: int
    heartbeat: float = 0.5
    dead_after: float = 3.0
    node_dead_after: float = 10.0
    busy_grace: float = 30.0
    max_members: int = 256
    #: a member learned from another's list and never heard is forgotten after this long
    forget_after: float = 40.0
    members: dict[Owner, Member] = field(default_factory=dict)
    seeds: set[str] = field(default_factory=set)
    #: the greatest incarnation of each owner we declared dead (sent in our heartbeats)
    dead_marks: dict[Owner, int] = field(default_factory=dict)
    #: owners whose records reached us only through others' gossip, and since when
    rumoured: dict[Owner, float] = field(default_factory=dict)
    last_tick: float = 0.0
    deaths: int = 0
    members_refused: int = 0
    members_forgotten: int = 0
    _effects: list[Effect] = field(default_factory=list)

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    # -- who is a member ------------------------------------------------------------------------

    def limit_for(self, owner: Owner) -> float:
        return self.dead_after if owner.node == self.me.node else self.node_dead_after

    def endpoint_for(self, owner: Owner, ipc: str, tcp: str) -> str:
        """Same-node members are reached over ipc, others over tcp."""
        return ipc if owner.node == self.me.node and ipc else tcp

    def add(self, owner: Owner, endpoint: str, now: float, *, ipc: str = "", tcp: str = "", region: int = 0,
            learned: bool = False) -> bool:
        """Know a member (heartbeat to it from now on); False if it is us or already known."""
        if owner == self.me or owner in self.members:
            return False
        self.members[owner] = Member(owner, endpoint, region=region, ipc=ipc, tcp=tcp, last_heard=now,
                                     learned=learned)
        self._effects.append(Connect(owner, endpoint))
        return True

    def add_seed(self, endpoint: str) -> None:
        """A `--join` address: heartbeat there until the member behind it is known by name."""
        self.seeds.add(endpoint)
        self._effects.append(Connect(seed_link(endpoint), endpoint))

    def _room(self) -> bool:
        if len(self.members) < self.max_members:
            return True
        self.members_refused += 1
        return False

    def _follow(self, member: Member, ipc: str, tcp: str, region: int | None = None) -> None:
        """The member names other endpoints than we use (it restarted elsewhere): follow it."""
        if (member.ipc, member.tcp) == (ipc, tcp):
            return
        endpoint = self.endpoint_for(member.owner, ipc, tcp)
        if endpoint:
            member.ipc, member.tcp, member.endpoint = ipc, tcp, endpoint
            if region is not None:
                member.region = region
            self._effects.append(Connect(member.owner, endpoint))

    # -- what members say -----------------------------------------------------------------------

    def on_heartbeat(self, hello: Hello, now: float) -> Member | None:
        """A member's heartbeat: learn it and the members it lists, notice whether it says we are
        dead. Returns the member if the heartbeat counts as hearing it (then a repair may be due)."""
        sender = hello.sender
        known = self.members.get(sender)
        if known is None and sender != self.me and self._room():
            endpoint = self.endpoint_for(sender, hello.ipc, hello.tcp)
            if endpoint:
                self.add(sender, endpoint, now, ipc=hello.ipc, tcp=hello.tcp, region=hello.region)
                log.info("mesh member %s/%d joined (region %d)", sender.node, sender.worker, hello.region)
        elif known is not None:
            self._follow(known, hello.ipc, hello.tcp, hello.region)
        for row in hello.members:
            if row.owner != self.me and row.owner not in self.members and self._room():
                endpoint = self.endpoint_for(row.owner, row.ipc, row.tcp)
                if endpoint:
                    self.add(row.owner, endpoint, now, ipc=row.ipc, tcp=row.tcp, region=row.region, learned=True)
        for owner, incarnation in hello.dead:
            if owner == self.me and incarnation >= self.incarnation:
                self._effects.append(Rejoin(f"{sender.node}/{sender.worker} declared us dead"))
                break
        return self.heard(sender, hello.incarnation, now)

    def on_delta(self, sender: Owner, incarnation: int, now: float, *, endpoints: tuple[str, str] | None = None
                 ) -> Member | None:
        """A member's directory delta; `endpoints` (ipc, tcp) when it says where it listens."""
        known = self.members.get(sender)
        if known is not None and endpoints is not None:
            self._follow(known, *endpoints)
        return self.heard(sender, incarnation, now)

    def heard(self, sender: Owner, incarnation: int, now: float) -> Member | None:
        """One of the member's loop messages arrived. Returns it, or None if the message does not
        count (an unknown member, or an incarnation that is older or declared dead)."""
        member = self.members.get(sender)
        if member is None:
            return None
        dead = self.dead_marks.get(sender)
        if dead is not None and incarnation <= dead:
            # a late message from a dead incarnation (also to a member forgotten and learned again,
            # whose state starts at incarnation 0): ignore until it rejoins, and our heartbeats'
            # dead list tells it to
            return None
        if incarnation > member.incarnation:
            if member.incarnation and member.incarnation != dead:
                # the process restarted or rejoined: everything its previous incarnation held is gone
                self._declare_dead(sender, member.incarnation)
            member.incarnation = incarnation
            self.dead_marks.pop(sender, None)
        elif incarnation < member.incarnation:
            return None
        member.last_heard = now
        member.ever_heard = True
        if not member.alive:
            member.alive = True
            log.info("mesh peer %s/%d is up (incarnation %d)", sender.node, sender.worker, incarnation)
        return member

    def on_pulse(self, sender: Owner, incarnation: int, silent_ms: int, now: float) -> bool:
        """A liveness-thread pulse: the member's process runs, whatever its loop is doing. Counts
        only for the incarnation we know (joins and restarts are the heartbeats' business)."""
        member = self.members.get(sender)
        if member is None or incarnation != member.incarnation or self.dead_marks.get(sender) == incarnation:
            return False
        member.last_pulse = now
        member.pulse_silent_ms = silent_ms
        return True

    def repair_due(self, member: Member, now: float) -> bool:
        """The member's digest differs from ours: repair with it at most once per heartbeat."""
        if now - member.last_repair < self.heartbeat:
            return False
        member.last_repair = now
        return True

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now: float, directory: DirectoryView) -> None:
        """Once per heartbeat interval: forget the unheard, judge every member's silence."""
        if self.last_tick and now - self.last_tick > max(STALL_FACTOR * self.heartbeat, 1.0):
            # Our own loop stalled (or the process was stopped): we cannot tell who went silent, so
            # give everyone a fresh grace period instead of declaring the whole cluster dead.
            for member in self.members.values():
                member.last_heard = now
                member.last_pulse = now
            self.rumoured = dict.fromkeys(self.rumoured, now)
        self.last_tick = now
        self._forget_unheard(now)
        for member in self.members.values():
            self._judge(member, now, directory)
        self._judge_rumoured(now, directory)

    def _forget_unheard(self, now: float) -> None:
        for owner in [o for o, m in self.members.items()
                      if m.learned and not m.ever_heard and now - m.last_heard > self.forget_after]:
            del self.members[owner]
            self._effects.append(Disconnect(owner))
            self.members_forgotten += 1

    def _judge(self, member: Member, now: float, directory: DirectoryView) -> None:
        state = verdict(now, member.last_heard, member.last_pulse, self.limit_for(member.owner), self.busy_grace)
        if state != DEAD:
            busy = state == BUSY
            if busy and not member.busy:
                log.warning("mesh peer %s/%d: loop silent for %.1fs but its process pulses: keeping its "
                            "keys for up to %.0fs more", member.owner.node, member.owner.worker,
                            now - member.last_heard, self.busy_grace)
            member.busy = busy
            return
        member.busy = False
        if member.alive:
            member.alive = False
            self.deaths += 1
            log.warning("mesh peer %s/%d silent for %.1fs: dropping its keys", member.owner.node,
                        member.owner.worker, now - member.last_heard)
        # Also a member we only ever heard of through others (its keys came in a third party's
        # repair) must not keep its keys forever once it stays silent.
        incarnation = max(member.incarnation, directory.known_incarnation(member.owner) or 0)
        if incarnation and self.dead_marks.get(member.owner, 0) < incarnation:
            member.incarnation = incarnation
            self._declare_dead(member.owner, incarnation)

    def _judge_rumoured(self, now: float, directory: DirectoryView) -> None:
        """An owner whose keys reached us in a third party's gossip before it was a member here
        (it died before anyone listed it, or before its own heartbeat arrived) gets a member's
        silence limit too: not heard from or named in a member list within it, its keys leave.
        Without this they stayed until the horizon. If it is alive after all, its heartbeat makes
        it a member, our dead list tells it, and it rejoins as a new incarnation."""
        rumoured: dict[Owner, float] = {}
        for owner in directory.owners():
            if owner == self.me or owner in self.members:
                continue
            since = rumoured[owner] = self.rumoured.get(owner, now)
            incarnation = directory.known_incarnation(owner)
            if now - since > self.limit_for(owner) and incarnation and self.dead_marks.get(owner, 0) < incarnation:
                log.warning("mesh: %s/%d, known only through others, silent for %.1fs: dropping its keys",
                            owner.node, owner.worker, now - since)
                self._declare_dead(owner, incarnation)
        self.rumoured = rumoured

    def _declare_dead(self, owner: Owner, incarnation: int) -> None:
        self.dead_marks[owner] = incarnation
        self._effects.append(DropKeys(owner, incarnation))

    # -- what we tell others --------------------------------------------------------------------

    def member_rows(self, ipc: str, tcp: str, region: int) -> list[list[Any]]:
        """Us (at these endpoints) and every member we consider alive, as a heartbeat lists them."""
        rows: list[list[Any]] = [[self.me.node, self.me.worker, ipc, tcp, region]]
        rows += [[o.node, o.worker, m.ipc, m.tcp, m.region] for o, m in self.members.items() if m.alive]
        return rows

    def dead_rows(self) -> list[list[Any]]:
        return [[o.node, o.worker, inc] for o, inc in self.dead_marks.items()]

    def heartbeat_links(self) -> Iterable[Hashable]:
        """Where a heartbeat goes: every member, and each seed not yet known alive by name."""
        yield from self.members
        known_tcp = {m.tcp for m in self.members.values() if m.alive}
        for seed in self.seeds:
            if seed not in known_tcp:
                yield seed_link(seed)

    def pulse_targets(self) -> dict[Hashable, str]:
        return {o: m.endpoint for o, m in self.members.items()}

    def local_alive(self) -> set[Owner]:
        """This node's members that are alive (they acknowledge our new keys)."""
        node = self.me.node
        return {owner for owner, m in self.members.items() if m.alive and owner.node == node}

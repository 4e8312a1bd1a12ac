"""The command line both atheris harnesses share: optional `--seed-corpus DIR`, then libFuzzer flags."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def run(argv: list[str], one_input: Callable[[bytes], None], seeds: Callable[[], list[bytes]]) -> None:
    if "--seed-corpus" in argv:
        at = argv.index("--seed-corpus")
        corpus = Path(argv[at + 1])
        corpus.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds()):
            (corpus / f"seed-{index:02d}").write_bytes(seed)
        argv = argv[:at] + argv[at + 2 :]
    import atheris

    atheris.Setup(argv, one_input)
    atheris.Fuzz()

"""Which voices a `--model` list names: one short name per checkpoint, in order.

    parse_voices("kyutai/moshiko-pytorch-bf16,kyutai/moshika-pytorch-bf16")
    # [Voice("moshiko", "kyutai/moshiko-pytorch-bf16"), Voice("moshika", "kyutai/moshika-pytorch-bf16")]

Plain string work, no torch: app.py names the voices at deploy time, on a machine that
may have no torch, exactly as the engine will name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

SEPARATOR = ","
# Kyutai's repos are <voice>-pytorch-<precision> (moshiko-pytorch-bf16, moshika-pytorch-q8).
_PYTORCH_SUFFIX = re.compile(r"-pytorch(-[^/]*)?$")
# What a name may hold: it rides on URLs (`?voice=`) and in recordings' file names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Voice:
    """One voice: its short `name` (`?voice=NAME`) and the model spec it loads."""

    name: str
    model: str


def short_name(model: str) -> str:
    """A model spec's short name: a repo's name without its owner and `-pytorch-...` suffix
    (`kyutai/moshika-pytorch-bf16` -> `moshika`), a directory's folder name, or the spec
    itself (`tiny`, `tiny-q8`, `random`)."""
    spec = model.rstrip("/")
    name = PurePath(spec).name if "/" in spec or spec.startswith(("~", ".")) else spec
    return _PYTORCH_SUFFIX.sub("", name) or name


def parse_voices(spec: str | list[str]) -> list[Voice]:
    """The voices of a comma-separated `--model` list (or a list of specs), the first being the
    default. An entry `NAME=MODEL` names its voice itself; otherwise it is `short_name(MODEL)`,
    and a name already taken gets `-2`, `-3`, ... (`tiny,tiny` -> `tiny`, `tiny-2`).
    ValueError for an empty list or entry, or a name that does not fit on a URL."""
    entries = spec.split(SEPARATOR) if isinstance(spec, str) else list(spec)
    entries = [entry.strip() for entry in entries]
    if not entries or not all(entries):
        raise ValueError(f"--model takes one model or a comma-separated list of them, got {spec!r}")
    voices: list[Voice] = []
    taken: set[str] = set()
    for entry in entries:
        name, given, model = entry.partition("=")
        if not given:
            name, model = short_name(entry), entry
        name, model = name.strip(), model.strip()
        if not _NAME.match(name) or not model:
            raise ValueError(f"{entry!r}: a voice's name is letters, digits, '.', '_' and '-' (NAME=MODEL)")
        if given and name in taken:
            raise ValueError(f"two voices are named {name!r}")
        unique, number = name, 2
        while unique in taken:
            unique, number = f"{name}-{number}", number + 1
        taken.add(unique)
        voices.append(Voice(unique, model))
    return voices


class UnknownVoice(ValueError):
    """A voice asked for that this server does not offer."""

    def __init__(self, name: str, names: list[str]) -> None:
        super().__init__(f"no voice {name!r} here; the voices are {', '.join(names)}")
        self.name = name
        self.names = names

"""Darknet `.cfg` parser: `[section]` headers, `key=value` lines, `#`/`;` comments.

Every error is one line naming the file, the line and the key, e.g.
``yolov4.cfg:57: [convolutional] filters='abc' is not an integer``.

    >>> cfg = parse_cfg_text("[net]\\nwidth=64\\nheight=64\\n[convolutional]\\nfilters=8\\nsize=3\\n", "toy.cfg")
    >>> cfg.net.width, cfg.net.height, cfg.net.channels, [s.type for s in cfg.layers]
    (64, 64, 3, ['convolutional'])
    >>> cfg.layers[0].integer("filters"), cfg.layers[0].integer("stride", 1)
    (8, 1)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qdet.errors import ConfigError

# Layer types this reader builds; anything else is refused with the line it starts on.
LAYER_TYPES = frozenset({"convolutional", "shortcut", "route", "upsample", "maxpool", "yolo"})
# Darknet spells some types two ways.
_ALIASES = {"conv": "convolutional", "net": "net", "network": "net", "max": "maxpool"}

_MISSING = object()


@dataclass
class Section:
    """One `[type]` block: its options (a repeated key keeps the last value, as Darknet does) and
    the line of the header and of each key, for error messages."""

    type: str
    line: int
    source: str  # file name, for messages
    options: dict[str, str] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)

    def where(self, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{self.source}:{line}: [{self.type}]"

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)} {message}")

    def has(self, key: str) -> bool:
        return key in self.options

    def text(self, key: str, default: object = _MISSING) -> str:
        if key not in self.options:
            if default is _MISSING:
                raise self.error(None, f"needs '{key}='")
            return default  # type: ignore[return-value]
        return self.options[key]

    def integer(self, key: str, default: object = _MISSING) -> int:
        raw = self.text(key, default)
        if not isinstance(raw, str):
            return raw  # type: ignore[return-value]
        try:
            return int(raw)
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not an integer") from None

    def number(self, key: str, default: object = _MISSING) -> float:
        raw = self.text(key, default)
        if not isinstance(raw, str):
            return raw  # type: ignore[return-value]
        try:
            return float(raw)
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not a number") from None

    def integers(self, key: str, default: object = _MISSING) -> list[int]:
        """A comma-separated list of integers (empty items, as in "1,2,", are ignored)."""
        raw = self.text(key, default)
        if not isinstance(raw, str):
            return list(raw)  # type: ignore[call-overload]
        items = [t.strip() for t in raw.split(",") if t.strip()]
        try:
            values = [int(t) for t in items]
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not a comma-separated list of integers") from None
        if not values:
            raise self.error(key, f"{key}= is empty")
        return values

    def numbers(self, key: str) -> list[float]:
        raw = self.text(key)
        items = [t.strip() for t in raw.split(",") if t.strip()]
        try:
            values = [float(t) for t in items]
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not a comma-separated list of numbers") from None
        if not values:
            raise self.error(key, f"{key}= is empty")
        return values


@dataclass(frozen=True)
class NetOptions:
    """What the `[net]` section says about the input."""

    width: int
    height: int
    channels: int
    letter_box: bool


@dataclass
class DarknetCfg:
    """A parsed cfg: `net` (the [net] section's input options) and `layers` (every other section, in order;
    Darknet's layer index i is `layers[i]`)."""

    source: str
    net_section: Section
    layers: list[Section]
    text: str = ""  # the cfg text it was parsed from (a saved .qdet stores it to rebuild the network)

    @property
    def net(self) -> NetOptions:
        s = self.net_section
        opts = NetOptions(s.integer("width", 416), s.integer("height", 416), s.integer("channels", 3), bool(s.integer("letter_box", 0)))
        for key in ("width", "height", "channels"):
            if getattr(opts, key) < 1:
                raise s.error(key, f"{key}={getattr(opts, key)} must be >= 1")
        return opts


def parse_cfg_text(text: str, source: str = "<cfg>") -> DarknetCfg:
    """Parse cfg text. `source` names the file in errors."""
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"{source}:{lineno}: malformed section header {raw.strip()!r}")
            kind = line[1:-1].strip().lower()
            kind = _ALIASES.get(kind, kind)
            if kind != "net" and kind not in LAYER_TYPES:
                known = ", ".join(sorted(LAYER_TYPES))
                raise ConfigError(f"{source}:{lineno}: unknown section [{kind}] (this reader builds: net, {known})")
            sections.append(Section(kind, lineno, source))
            continue
        if "=" not in line:
            raise ConfigError(f"{source}:{lineno}: expected 'key=value' or '[section]', got {raw.strip()!r}")
        if not sections:
            raise ConfigError(f"{source}:{lineno}: option {raw.strip()!r} before the first [section]")
        key, value = (t.strip() for t in line.split("=", 1))
        if not key:
            raise ConfigError(f"{source}:{lineno}: empty key in {raw.strip()!r}")
        if not value:
            raise ConfigError(f"{source}:{lineno}: [{sections[-1].type}] {key}= has no value")
        sections[-1].options[key] = value
        sections[-1].key_lines[key] = lineno
    if not sections or sections[0].type != "net":
        raise ConfigError(f"{source}: the first section must be [net] (or [network])")
    extra = [s for s in sections[1:] if s.type == "net"]
    if extra:
        raise ConfigError(f"{source}:{extra[0].line}: a second [net] section")
    if len(sections) == 1:
        raise ConfigError(f"{source}: no layers after [net]")
    return DarknetCfg(source, sections[0], sections[1:], text)


def parse_cfg(path: str | Path) -> DarknetCfg:
    """Parse a `.cfg` file (errors name it by its file name)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"cannot read Darknet cfg '{path}': {e.strerror or e}") from None
    return parse_cfg_text(text, path.name)

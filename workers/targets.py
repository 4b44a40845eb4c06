"""Which classes to explain for each image: the top-k most probable, or fixed classes given by id or name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


class TargetError(ValueError):
    """A ``--classes`` entry names no class (or several); raised before any image is touched."""


@dataclass(frozen=True)
class Targets:
    """Which classes to explain: the ``topk`` most probable, or fixed ``classes``."""

    topk: int | None = 3
    classes: tuple[int, ...] = ()

    def select(self, probs: Tensor) -> Tensor:
        """B×K class ids for B×N class probabilities."""
        if self.classes:
            return torch.tensor(self.classes, device=probs.device).expand(probs.shape[0], -1)
        return probs.topk(self.topk, dim=1).indices

    def describe(self) -> dict:
        return {"classes": list(self.classes)} if self.classes else {"topk": self.topk}


def parse_classes(text: str, class_names: Sequence[str]) -> tuple[int, ...]:
    """Class ids from text such as ``"281, tabby, Egyptian cat"``, in order, duplicates dropped.

    Rule: commas always separate entries, so a class whose name contains a comma is given by its id.
    An entry of digits is a class id; anything else is a class name, matched ignoring case. Where
    names differ only in case (ImageNet's "Cardigan" the corgi, 264, and "cardigan" the sweater, 474)
    the exact spelling picks one and any other spelling is refused as ambiguous.
    """
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for class_id, name in enumerate(class_names):
        exact.setdefault(name.strip(), []).append(class_id)
        folded.setdefault(name.strip().casefold(), []).append(class_id)
    ids: list[int] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise TargetError(f"empty entry in --classes {text!r}")
        if entry.lstrip("-").isdigit():
            class_id = int(entry)
            if not 0 <= class_id < len(class_names):
                raise TargetError(f"class id {class_id} outside 0..{len(class_names) - 1}")
            ids.append(class_id)
            continue
        matches = exact[entry] if len(exact.get(entry, ())) == 1 else folded.get(entry.casefold(), [])
        if not matches:
            raise TargetError(f"unknown class name {entry!r}{_suggestions(entry, folded, class_names)}")
        if len(matches) > 1:
            options = ", ".join(f"{class_names[i]!r} = {i}" for i in matches)
            raise TargetError(f"class name {entry!r} is ambiguous ({options}); give the id or the exact spelling")
        ids.append(matches[0])
    return tuple(dict.fromkeys(ids))


def _suggestions(entry: str, folded: dict[str, list[int]], class_names: Sequence[str]) -> str:
    close = difflib.get_close_matches(entry.casefold(), list(folded), n=5, cutoff=0.6)
    if not close:
        return " (no similar class name; class ids work too)"
    named = ", ".join(f"{class_names[folded[c][0]]!r} ({', '.join(map(str, folded[c]))})" for c in close)
    return f"; did you mean: {named}?"

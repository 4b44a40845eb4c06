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
    """Which classes to explain: the ``topk`` most probable or fixed ``classes``, and with ``label`` each image's
    ground-truth label after them (or alone)."""

    topk: int | None = 3
    classes: tuple[int, ...] = ()
    label: bool = False

    def select(self, probs: Tensor, labels: Tensor | None = None) -> Tensor:
        """B×K class ids for B×N class probabilities (``labels``: B class ids, needed with ``label``)."""
        if self.classes:
            chosen = torch.tensor(self.classes, device=probs.device).expand(probs.shape[0], -1)
        elif self.topk:
            chosen = probs.topk(self.topk, dim=1).indices
        else:
            chosen = probs.new_empty((probs.shape[0], 0), dtype=torch.long)
        if not self.label:
            return chosen
        if labels is None:
            raise TargetError("explaining the ground-truth label needs a label for every image")
        return torch.cat([chosen, labels.to(probs.device, torch.long)[:, None]], dim=1)

    def describe(self) -> dict:
        described = {"classes": list(self.classes)} if self.classes else {"topk": self.topk} if self.topk else {}
        return {**described, "label": True} if self.label else described


def parse_classes(text: str, class_names: Sequence[str]) -> tuple[int, ...]:
    """Class ids from text such as ``"281, tabby, Egyptian cat"``, in order, duplicates dropped.

    Rule: commas always separate entries, so a class whose name contains a comma is given by its id.
    An entry of digits is a class id; anything else is a class name, matched ignoring case. Where
    names differ only in case (ImageNet's "Cardigan" the corgi, 264, and "cardigan" the sweater, 474)
    the exact spelling picks one and any other spelling is refused as ambiguous.
    """
    names = ClassNames(class_names)
    ids: list[int] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise TargetError(f"empty entry in --classes {text!r}")
        ids.append(names.class_id(int(entry) if entry.lstrip("-").isdigit() else entry))
    return tuple(dict.fromkeys(ids))


class ClassNames:
    """A model's class names, to turn an id or a name (any case, as ``parse_classes`` says) into a class id."""

    def __init__(self, class_names: Sequence[str]):
        self.names = list(class_names)
        self.exact: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        for class_id, name in enumerate(self.names):
            self.exact.setdefault(name.strip(), []).append(class_id)
            self.folded.setdefault(name.strip().casefold(), []).append(class_id)

    def class_id(self, entry: int | str) -> int:
        if isinstance(entry, int):
            if not 0 <= entry < len(self.names):
                raise TargetError(f"class id {entry} outside 0..{len(self.names) - 1}")
            return entry
        entry = entry.strip()
        matches = self.exact[entry] if len(self.exact.get(entry, ())) == 1 else self.folded.get(entry.casefold(), [])
        if not matches:
            raise TargetError(f"unknown class name {entry!r}{_suggestions(entry, self.folded, self.names)}")
        if len(matches) > 1:
            options = ", ".join(f"{self.names[i]!r} = {i}" for i in matches)
            raise TargetError(f"class name {entry!r} is ambiguous ({options}); give the id or the exact spelling")
        return matches[0]


def _suggestions(entry: str, folded: dict[str, list[int]], class_names: Sequence[str]) -> str:
    close = difflib.get_close_matches(entry.casefold(), list(folded), n=5, cutoff=0.6)
    if not close:
        return " (no similar class name; class ids work too)"
    named = ", ".join(f"{class_names[folded[c][0]]!r} ({', '.join(map(str, folded[c]))})" for c in close)
    return f"; did you mean: {named}?"

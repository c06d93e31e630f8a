"""How ChatData and PreferenceData count and report the records they could not use.

Nothing is dropped silently: a skipped record is counted under its reason, the first few keep their location so
they can be found again, and a split left with nothing usable fails with one line naming its data and why.
"""

from __future__ import annotations

from collections import Counter

MAX_EXAMPLES = 5  # skipped-record locations kept per split


def count_skip(skipped: Counter, examples: list[str], where: str, reason: str) -> None:
    """Count one skipped record under `reason`, keeping its location among the first MAX_EXAMPLES."""
    skipped[reason] += 1
    if len(examples) < MAX_EXAMPLES:
        examples.append(f"{where}: {reason}")


def reasons(skipped: Counter) -> str:
    """'reason: count, ...' in reason order; empty when nothing was skipped."""
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))


def skip_summary(skipped: Counter) -> str:
    """'skipped N (reason: count, ...)', or 'skipped 0'."""
    listed = reasons(skipped)
    return f"skipped {sum(skipped.values())}" + (f" ({listed})" if listed else "")


def nothing_usable(
    *,
    usable: str,
    check: str,
    split: str,
    train: list[str],
    val: list[str] | None,
    val_fraction: float,
    max_length: int,
    skipped: Counter,
) -> str:
    """The one-line error for a split with no `usable` record: where its records came from (its files, or the
    held-out share of train's), what was skipped and why, and what to `check`."""
    if split == "train" or val is not None:
        data = str(train if split == "train" else val)
    else:
        data = f"the val_fraction={val_fraction} share of {train}"
    return (
        f"no {usable} in {split} data {data} at max_length={max_length} (skipped: {reasons(skipped) or 'no records'}); "
        f"check {check} or raise max_length"
    )

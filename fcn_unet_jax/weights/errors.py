"""The one error of weight import: a file or a variable tree that does not fit the model.

Conversion (`rules.apply_rules`) and merging (`merge.merge_variables`) check everything
first and raise a single `WeightImportError` listing every problem, so a user fixes a wrong
file in one round rather than one key at a time.
"""

from collections.abc import Sequence

_MAX_LISTED = 25  # Names listed per category in an error; the rest are counted.


class WeightImportError(ValueError):
    """A weights file does not fit the model: lists every missing, unexpected and misshaped key.

    Attributes:
        missing: names the target expects but the source lacks.
        unexpected: names in the source that the target has no place for.
        mismatched: (name, expected shape, shape found) triples.
    """

    def __init__(
        self,
        what: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        hints: Sequence[str] = (),
    ):
        """Builds the message: `what`, then each non-empty category, then the hints.

        Args:
            what: the first line, naming the source and the model.
            missing: see the class attributes.
            unexpected: see the class attributes.
            mismatched: see the class attributes.
            hints: likely causes and fixes, one line each.
        """
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [what]
        for title, items in (
            ('missing keys', self.missing),
            ('unexpected keys', self.unexpected),
            (
                'shape mismatches (expected vs got)',
                [f'{k}: expected {tuple(e)}, got {tuple(g)}' for k, e, g in self.mismatched],
            ),
        ):
            if items:
                lines.append(f'  {title} ({len(items)}):')
                lines.extend(f'    {item}' for item in items[:_MAX_LISTED])
                if len(items) > _MAX_LISTED:
                    lines.append(f'    ... and {len(items) - _MAX_LISTED} more')
        lines.extend(f'  hint: {hint}' for hint in hints)
        super().__init__('\n'.join(lines))

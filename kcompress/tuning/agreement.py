"""How close a model's outputs are to a reference model's, and how candidates are ranked by it: the
agreement of their decisions first, their logits' error as the tie-break. Every automatic choice scored on
held-out data without labels (calibration candidates, distillation and fine-tuning rates) uses it."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from kcompress.tuning.evaluate import eval_mode, run_model
from kcompress.tuning.layer_match import first_tensor


def better(candidate: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Whether ``candidate`` is closer to the dense model than ``best`` (both :func:`output_agreement`
    records on the same held-out inputs): by the agreement of their decisions (argmax per output position)
    when it differs by more than its sampling noise, ``1/√n`` for ``n`` held-out decisions; otherwise (a tie,
    or outputs without classes) by the relative output error of the logits. On a BiLSTM tagger the logit
    error alone chose a tt fit whose decisions agreed with dense at 0.667 over one at 0.952; with a few dozen
    held-out sequences of one decision each, agreement moves by one sequence and the logits decide."""
    decisions = min(int(candidate.get("decisions", 0)), int(best.get("decisions", 0)))
    mine, theirs = candidate.get("argmax_agreement"), best.get("argmax_agreement")
    if mine is not None and theirs is not None and decisions and abs(mine - theirs) > 1 / math.sqrt(decisions):
        return bool(mine > theirs)
    return float(candidate["relative_error"]) < float(best["relative_error"])


def best_index(records: Sequence[Mapping[str, Any]]) -> int:
    """The index of the record closest to the dense model (:func:`better`; the first of equals)."""
    chosen = 0
    for index in range(1, len(records)):
        if better(records[index], records[chosen]):
            chosen = index
    return chosen


def output_agreement(model: nn.Module, reference: nn.Module,
                     calls: Sequence[Union[Tensor, tuple[Any, ...]]]) -> dict[str, Any]:
    """How close ``model``'s outputs are to ``reference``'s on ``calls``: ``relative_error``
    ``‖y − y_ref‖ / ‖y_ref‖`` over all outputs and, for outputs with a class axis (last size > 1),
    ``argmax_agreement``, the fraction of rows with the same argmax."""
    num = den = 0.0
    same = rows = 0
    with torch.no_grad(), eval_mode(model), eval_mode(reference):
        for call in calls:
            output, expected = first_tensor(run_model(model, call)), first_tensor(run_model(reference, call))
            num += float((output.double() - expected.double()).square().sum())
            den += float(expected.double().square().sum())
            if expected.dim() >= 1 and expected.shape[-1] > 1:
                same += int((output.argmax(-1) == expected.argmax(-1)).sum())
                rows += expected[..., 0].numel()
    result: dict[str, Any] = {"relative_error": math.sqrt(num / den) if den > 0 else math.sqrt(num)}
    if rows:
        result["argmax_agreement"], result["decisions"] = same / rows, rows
    return result


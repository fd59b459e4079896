"""Several streams through one TTT layer's streaming state, driven as a multi-slot runner drives
them: shared by the In-Place and TTT-MLP tests."""

from __future__ import annotations

import dataclasses
import typing as tp
from dataclasses import dataclass

import torch

from moshi_ttt.report.schema import UpdateRecord
from moshi_ttt.ttt.base import FastWeightModule, LayerReport

Forward = tp.Callable[..., torch.Tensor]  # one step: per-input [B, 1, ...] batches -> [B, 1, D]


@dataclass
class StreamRun:
    """What one stream produced: outputs [1, T, D], final fast weights, and (streamed) its report."""

    outputs: torch.Tensor
    weights: dict[str, torch.Tensor]
    report: LayerReport | None = None


def run_streams(
    module: FastWeightModule,
    forward: Forward,
    sequences: list[tuple[torch.Tensor, ...]],
    schedules: list[tp.Sequence[int]],
    resets: tp.Mapping[int, tp.Collection[int]] | None = None,
    before_step: tp.Callable[[int], None] | None = None,
) -> list[StreamRun]:
    """Stream `sequences[b]` (the forward's inputs, each [1, T_b, ...]) as stream b of one
    streaming batch (the module must be streaming with len(sequences)), its tokens fed in order
    at the steps `schedules[b]` (T_b of them).

    At any other step a stream is masked out (exec_mask False, `active` False) and fed loud random
    filler, which must change nothing. A stream is flushed alone at its last step while the others
    go on. `resets` {step: streams} resets those streams only (`reset_streaming(reset_mask)`)
    before that step; `before_step(step)` runs before each step. Outputs of masked steps are
    dropped.
    """
    ends = [max(schedule) + 1 for schedule in schedules]
    filler = torch.Generator().manual_seed(1234)
    fed = [0] * len(sequences)
    outputs: list[list[torch.Tensor]] = [[] for _ in sequences]
    for step in range(max(ends)):
        if resets and step in resets:
            module.reset_streaming(torch.tensor([b in resets[step] for b in range(len(sequences))]))
        if before_step is not None:
            before_step(step)
        active = [step in schedule for schedule in schedules]
        batches = []
        for k in range(len(sequences[0])):
            rows = [
                seq[k][:, i : i + 1]
                if on
                else 10 * torch.randn(seq[k][:, :1].shape, generator=filler).to(seq[k].device)
                for seq, i, on in zip(sequences, fed, active)
            ]
            batches.append(torch.cat(rows))
        module.set_exec_mask(torch.tensor(active))
        out = forward(*batches)
        module.after_token(active)
        for b, on in enumerate(active):
            if on:
                outputs[b].append(out[b : b + 1])
                fed[b] += 1
        ended = [b for b, end in enumerate(ends) if end == step + 1]
        if ended:
            module.flush(ended)
    state = module._streaming_state
    return [
        StreamRun(
            torch.cat(out, dim=1), {name: value[b].clone() for name, value in state.fast.items()}, module.report(b)
        )
        for b, out in enumerate(outputs)
    ]


def assert_same_run(got: StreamRun, expected: StreamRun, atol: float = 1e-5) -> None:
    """Outputs and final weights within `atol`; counts (if both reported) exactly equal."""
    assert (got.outputs - expected.outputs).abs().max() <= atol
    assert got.weights.keys() == expected.weights.keys()
    for name, value in expected.weights.items():
        assert (got.weights[name] - value).abs().max() <= atol, name
    if got.report is not None and expected.report is not None:
        counts = ("tokens", "updates", "pending_tokens", "clipped_updates")
        assert [getattr(got.report, c) for c in counts] == [getattr(expected.report, c) for c in counts]
        if got.report.timeline is not None or expected.report.timeline is not None:
            assert_same_timeline(got.report.timeline, expected.report.timeline, atol)


def assert_same_timeline(
    got: list[UpdateRecord] | None, expected: list[UpdateRecord] | None, atol: float = 1e-5
) -> None:
    """Same updates at the same tokens, same clips, numbers within `atol` (relative for large ones)."""
    assert got is not None and expected is not None
    assert [(r.token, r.tokens, r.clipped) for r in got] == [(r.token, r.tokens, r.clipped) for r in expected]
    for g, e in zip(got, expected):
        for name in ("update_norm", "update_norm_unclipped", "drift", "loss_before", "loss_after"):
            mine, theirs = getattr(g, name), getattr(e, name)
            assert (mine is None) == (theirs is None), name
            if mine is not None:
                assert abs(mine - theirs) <= atol * max(1.0, abs(theirs)), (name, mine, theirs)


def span(start: int, length: int) -> range:
    return range(start, start + length)


def stream_snapshot(module: FastWeightModule, stream: int) -> dict[str, tp.Any]:
    """Everything the streaming state holds for one stream (copies)."""
    state = module._streaming_state
    rows: dict[str, tp.Any] = {f"fast.{k}": v[stream].clone() for k, v in state.fast.items()}
    rows.update({f"scratch.{k}": v[stream].clone() for k, v in state.scratch.items()})
    for name in ("write_pos", "clipped_updates", "first_nonfinite"):
        rows[name] = getattr(state, name)[stream].clone()
    rows["counters"] = dataclasses.asdict(state.streams[stream])
    return rows


def assert_same_snapshot(before: dict[str, tp.Any], after: dict[str, tp.Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
        assert same, f"{key} changed"

"""In-Place TTT: streaming token by token equals the chunk-parallel computation, lr=0 is plain
Moshi, updates are driven by the runner, and every file starts from the checkpoint's weights."""

from __future__ import annotations

import math

import pytest
import torch
from moshi.modules.gating import make_gating
from safetensors.torch import load_file
from torch import nn

from helpers import stream_lm
from helpers.streams import StreamRun, assert_same_run, assert_same_snapshot, run_streams, span, stream_snapshot
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import StreamingError
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt.ttt.base import TTTController
from moshi_ttt.ttt.inplace import InPlaceTTTConfig, InPlaceTTTGating, TokenEmbeddingTap, inplace_ttt_parallel

DIM = 16


class Identity(nn.Module):
    """Stands in for the transformer whose input the tap records."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_module(
    chunk_size: int = 4, lr: float = 0.5, kernel: int = 2, clip: float | None = None, seed: int = 0
) -> tuple[InPlaceTTTGating, Identity]:
    torch.manual_seed(seed)
    transformer = Identity()
    gating = make_gating("silu", DIM, 4 * DIM)
    config = InPlaceTTTConfig(
        layers=[0], chunk_size=chunk_size, learning_rate=lr, conv_kernel_size=kernel, delta_clip=clip
    )
    return InPlaceTTTGating(gating, 0, config, TokenEmbeddingTap(transformer)), transformer


def stream(module: InPlaceTTTGating, transformer: Identity, x: torch.Tensor, x0: torch.Tensor):
    outs = []
    with module.streaming(1):
        for t in range(x.shape[1]):
            transformer(x0[:, t : t + 1])
            outs.append(module(x[:, t : t + 1]))
            module.after_token()
        module.flush()
        state = module._streaming_state
        return torch.cat(outs, 1), state.fast["W"][0].clone(), module.report()


def naive_reference(
    z: torch.Tensor,
    x0: torch.Tensor,
    w0: torch.Tensor,
    module: InPlaceTTTGating,
    chunk_size: int,
    lr: float,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Algorithm 1 literally: per chunk, apply with the old weights, then update from that chunk.

    With `clip` (the research `delta_clip_fro_norm`), each chunk's delta D = V^T Z is scaled by
    min(1, clip / (||D||_F + 1e-12)) *before* the learning rate. Also returns every chunk's
    unclipped ||D||_F.
    """
    conv = module.target_generator.conv1d.conv.weight  # [D, D, K]
    w_target = module.target_generator.W_target.weight
    w = w0.clone()
    outs = []
    norms = []
    for start in range(0, z.shape[1], chunk_size):
        zc, xc = z[0, start : start + chunk_size], x0[0, start : start + chunk_size]
        outs.append(zc @ w.T)
        v = torch.zeros_like(xc)
        for t in range(len(xc)):
            for k in range(conv.shape[2]):
                if t + k < len(xc):  # zero padding at the chunk's end: never the next chunk
                    v[t] += conv[:, :, k] @ xc[t + k]
        delta = (v @ w_target.T).T @ zc
        norms.append(float(torch.linalg.norm(delta.detach())))
        if clip is not None:
            delta = delta * min(1.0, clip / (norms[-1] + 1e-12))
        w = w + lr * delta
    return torch.cat(outs)[None], w, norms


@pytest.mark.parametrize("length", [5, 11, 16, 19])
@pytest.mark.parametrize("clip", [None, 2e-3])
def test_module_streaming_equals_parallel(length: int, clip: float | None) -> None:
    module, transformer = make_module(clip=clip)
    x, x0 = torch.randn(1, length, DIM), torch.randn(1, length, DIM)
    with torch.no_grad():
        transformer(x0)
        parallel = module(x)
        w_parallel = module.last_parallel_state["W"][0]
        streamed, w_streamed, report = stream(module, transformer, x, x0)
    assert (streamed - parallel).abs().max() <= 1e-5
    assert (w_streamed - w_parallel).abs().max() <= 1e-5
    assert report.tokens == length
    assert report.updates == math.ceil(length / 4)
    assert report.pending_tokens == 0
    assert report.drift > 0
    if clip is not None:
        # Each chunk's delta is clipped before the learning rate: drift <= updates * lr * clip.
        assert report.drift <= report.updates * 0.5 * clip * (1 + 1e-5)


@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_parallel_matches_algorithm_1(kernel: int) -> None:
    module, transformer = make_module(chunk_size=4, lr=0.3, kernel=kernel)
    x, x0 = torch.randn(1, 13, DIM), torch.randn(1, 13, DIM)
    with torch.no_grad():
        z = module._gate(x)
        out, w_final = inplace_ttt_parallel(z, x0, module.w_down, module.target_generator, 4, 0.3)
        ref_out, ref_w, _ = naive_reference(z, x0, module.w_down, module, 4, 0.3)
    assert (out - ref_out).abs().max() <= 1e-5
    assert (w_final[0] - ref_w).abs().max() <= 1e-5


@pytest.mark.parametrize("length", [13, 16])
def test_clip_matches_the_research_rule(length: int) -> None:
    """tau between the smallest and largest chunk delta: some chunks clip, others do not, and
    both paths follow the research rule (clip D, then multiply by lr), counting the clips."""
    lr = 0.3
    module, transformer = make_module(chunk_size=4, lr=lr, seed=3)
    x, x0 = torch.randn(1, length, DIM), torch.randn(1, length, DIM)
    with torch.no_grad():
        z = module._gate(x)
        _, _, norms = naive_reference(z, x0, module.w_down, module, 4, lr)
        ranked = sorted(norms)
        tau = (ranked[1] + ranked[2]) / 2  # clips the two larger chunks only, far from ties
        module.config.delta_clip = tau
        ref_out, ref_w, _ = naive_reference(z, x0, module.w_down, module, 4, lr, clip=tau)
        transformer(x0)
        parallel = module(x)
        streamed, w_streamed, report = stream(module, transformer, x, x0)
    assert report.clipped_updates == sum(n > tau for n in norms) == 2
    for out in (parallel, streamed):
        assert (out - ref_out).abs().max() <= 1e-5
    for w in (module.last_parallel_state["W"][0], w_streamed):
        assert (w - ref_w).abs().max() <= 1e-5
    # Clipping lr * D instead (the old rule) would give other weights: the test can tell.
    _, w_old_rule, _ = naive_reference(z, x0, module.w_down, module, 4, lr, clip=tau / lr)
    assert (w_old_rule - ref_w).abs().max() > 1e-4


def test_timeline_replays_algorithm_1() -> None:
    """With the timeline on, each update is recorded where it happened, with Algorithm 1's norms
    (lr * ||D||_F before the clip, lr * min(||D||_F, ~tau) after), its clip flag and the running
    drift of the literal per-chunk loop; the totals agree and the outputs are bit-identical."""
    lr, length = 0.3, 14
    module, transformer = make_module(chunk_size=4, lr=lr, seed=3)
    x, x0 = torch.randn(1, length, DIM), torch.randn(1, length, DIM)
    with torch.no_grad():
        z = module._gate(x)
        w0 = module.w_down.clone()
        _, _, norms = naive_reference(z, x0, w0, module, 4, lr)
        ranked = sorted(norms)
        tau = (ranked[1] + ranked[2]) / 2  # two chunks clip, two do not
        module.config.delta_clip = tau
        plain, w_plain, plain_report = stream(module, transformer, x, x0)
        module.record_timeline = True
        out, w, report = stream(module, transformer, x, x0)
        ends = [4, 8, 12, 14]
        drifts = [
            float(torch.linalg.norm(naive_reference(z[:, :end], x0[:, :end], w0, module, 4, lr, clip=tau)[1] - w0))
            for end in ends
        ]
    assert plain_report.timeline is None
    assert torch.equal(out, plain) and torch.equal(w, w_plain)
    timeline = report.timeline
    assert len(timeline) == report.updates == 4
    assert [(r.token, r.tokens) for r in timeline] == [(4, 4), (8, 4), (12, 4), (14, 2)]
    assert [r.clipped for r in timeline] == [n > tau for n in norms]
    assert sum(r.clipped for r in timeline) == report.clipped_updates == 2
    for record, norm, drift in zip(timeline, norms, drifts):
        assert record.update_norm_unclipped == pytest.approx(lr * norm, rel=1e-5)
        assert record.update_norm == pytest.approx(lr * min(norm, tau), rel=1e-5)
        assert record.drift == pytest.approx(drift, rel=1e-5)
        assert record.loss_before is None and record.loss_after is None
    assert timeline[-1].drift == pytest.approx(report.drift, rel=1e-9)


def test_last_chunk_target_does_not_see_past_the_stream() -> None:
    """The final partial chunk is updated from its own tokens only: appending tokens after a
    flush boundary must not change the updates that came before them."""
    module, transformer = make_module(chunk_size=4)
    x, x0 = torch.randn(1, 8, DIM), torch.randn(1, 8, DIM)
    with torch.no_grad():
        _, w_first, _ = stream(module, transformer, x[:, :4], x0[:, :4])
        with module.streaming(1):
            for t in range(8):
                transformer(x0[:, t : t + 1])
                module(x[:, t : t + 1])
                module.after_token()
                if t == 3:
                    w_after_chunk = module._streaming_state.fast["W"][0].clone()
    assert torch.equal(w_first, w_after_chunk)


def test_streaming_requires_the_controller_between_steps() -> None:
    module, transformer = make_module()
    with torch.no_grad(), module.streaming(1):
        transformer(torch.randn(1, 1, DIM))
        module(torch.randn(1, 1, DIM))
        with pytest.raises(StreamingError, match="after_step"):
            module(torch.randn(1, 1, DIM))


# --- several streams at once (multi-slot runner) ---------------------------------------------------


def inplace_step(module: InPlaceTTTGating, transformer: Identity):
    def step(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        transformer(x0)
        return module(x)

    return step


def alone(module: InPlaceTTTGating, transformer: Identity, x: torch.Tensor, x0: torch.Tensor) -> StreamRun:
    out, w, report = stream(module, transformer, x, x0)
    return StreamRun(out, {"W": w}, report)


def parallel_run(module: InPlaceTTTGating, transformer: Identity, x: torch.Tensor, x0: torch.Tensor) -> StreamRun:
    transformer(x0)
    out = module(x)
    return StreamRun(out, {"W": module.last_parallel_state["W"][0]})


@pytest.mark.parametrize("clip", [None, 2e-3])
def test_streams_of_different_lengths_each_run_as_if_alone(clip: float | None) -> None:
    """3 streams of 5, 11 and 16 tokens, starting at different steps, masked before they start
    and after they end, each flushed when it ends: each equals its own run at B=1 and the
    chunk-parallel computation."""
    module, transformer = make_module(clip=clip)
    sequences = [(torch.randn(1, n, DIM), torch.randn(1, n, DIM)) for n in (5, 11, 16)]
    # Streams 0 and 2 fill a chunk at the same step (7): one update for both, 1 left alone.
    schedules = [span(4, 5), span(1, 11), span(0, 16)]
    with torch.no_grad():
        with module.streaming(3):
            runs = run_streams(module, inplace_step(module, transformer), sequences, schedules)
        for run, (x, x0) in zip(runs, sequences):
            assert_same_run(run, alone(module, transformer, x, x0))
            assert_same_run(run, parallel_run(module, transformer, x, x0))
            assert (run.report.tokens, run.report.updates) == (x.shape[1], math.ceil(x.shape[1] / 4))
    if clip is not None:
        assert sum(run.report.clipped_updates for run in runs) > 0


@pytest.mark.parametrize("reset", [(1,), (0, 2)])
def test_resetting_streams_restarts_them_and_leaves_the_others_alone(reset: tuple[int, ...]) -> None:
    """The `reset` streams stream 6 tokens of one file (a chunk applied, 2 tokens pending), are
    reset alone, then stream their next file: that file runs as on a fresh state, the other
    streams as undisturbed."""
    module, transformer = make_module()
    module.record_timeline = True  # each stream's timeline restarts with its next file
    sequences = [(torch.randn(1, n, DIM), torch.randn(1, n, DIM)) for n in (13, 14, 12)]
    slots = [
        tuple(torch.cat([torch.randn(1, 6, DIM), part], dim=1) for part in seq) if b in reset else seq
        for b, seq in enumerate(sequences)
    ]
    with torch.no_grad():
        with module.streaming(3):
            runs = run_streams(
                module,
                inplace_step(module, transformer),
                slots,
                [span(0, slot[0].shape[1]) for slot in slots],
                resets={6: reset},
            )
        for b in reset:
            runs[b].outputs = runs[b].outputs[:, 6:]
        for run, (x, x0) in zip(runs, sequences):
            assert_same_run(run, alone(module, transformer, x, x0))
    assert all(run.report.timeline for run in runs)


def test_masked_steps_leave_a_stream_untouched() -> None:
    """Stream 0 pauses mid-chunk for 4 steps while stream 1 goes on (and commits): its weights,
    buffers, position and counts stay bit for bit, and its later outputs are its own run's."""
    module, transformer = make_module()
    sequences = [(torch.randn(1, 10, DIM), torch.randn(1, 10, DIM)), (torch.randn(1, 14, DIM), torch.randn(1, 14, DIM))]
    snapshots = {}

    def snapshot(step: int) -> None:
        if step in (2, 6):
            snapshots[step] = stream_snapshot(module, 0)

    with torch.no_grad():
        with module.streaming(2):
            runs = run_streams(
                module,
                inplace_step(module, transformer),
                sequences,
                [[0, 1, *range(6, 14)], span(0, 14)],
                before_step=snapshot,
            )
        assert_same_snapshot(snapshots[2], snapshots[6])
        assert snapshots[2]["counters"]["pending"] == 2  # mid-chunk: the buffer holds tokens
        for run, (x, x0) in zip(runs, sequences):
            assert_same_run(run, alone(module, transformer, x, x0))


def test_a_batch_of_streams_needs_the_stream_named() -> None:
    module, transformer = make_module()
    with torch.no_grad(), module.streaming(2):
        with pytest.raises(StreamingError, match="say which one"):
            module.report()
        with pytest.raises(StreamingError, match="no stream 2"):
            module.report(2)
        transformer(torch.randn(2, 1, DIM))
        module(torch.randn(2, 1, DIM))
        with pytest.raises(StreamingError, match="1 stream flags for 2 streams"):
            module.after_token([True])


def test_fast_weight_stays_float32_in_a_bf16_model() -> None:
    module, transformer = make_module()
    module.to(torch.bfloat16)
    module.w_down.data = module.linear_out.weight.float()
    with torch.no_grad(), module.streaming(1):
        transformer(torch.randn(1, 1, DIM, dtype=torch.bfloat16))
        out = module(torch.randn(1, 1, DIM, dtype=torch.bfloat16))
        assert module._streaming_state.fast["W"].dtype == torch.float32
        assert out.dtype == torch.bfloat16


# --- whole model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ttt_model(tiny_inplace):
    return load_model(str(tiny_inplace.base), str(tiny_inplace.finetune))


@pytest.fixture(scope="module")
def plain_model(tiny_inplace):
    return load_model(str(tiny_inplace.base))


def random_tokens(lm, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.text_card, (1, 1, length), generator=gen)
    audio = torch.randint(0, lm.card, (1, lm.num_codebooks - 1, length), generator=gen)
    return torch.cat([text, audio], dim=1)


def final_fast_weights(lm) -> list[torch.Tensor]:
    return [layer._streaming_state.fast["W"][0].clone() for layer in TTTController(lm).layers]


@pytest.mark.parametrize("length", [21, 27])
def test_whole_model_streaming_equals_parallel(ttt_model, length: int) -> None:
    lm = ttt_model.lm
    tokens = random_tokens(lm, length, seed=length)
    with torch.no_grad():
        parallel, _ = lm.forward_text(tokens)
        layers = TTTController(lm).layers
        parallel_weights = [layer.last_parallel_state["W"][0].clone() for layer in layers]
        streamed, streamed_weights = stream_lm(lm, tokens, inspect=final_fast_weights)
    assert [layer.layer_index for layer in layers] == [1, 3]
    assert (streamed - parallel).abs().max() <= 1e-5
    for w_stream, w_par, layer in zip(streamed_weights, parallel_weights, layers):
        assert (w_stream - w_par).abs().max() <= 1e-5
        assert (w_stream - layer.w_down).abs().max() > 1e-4  # it did adapt


def test_zero_learning_rate_is_plain_moshi(tiny_inplace, plain_model, recordings) -> None:
    model = load_model(str(tiny_inplace.base), str(tiny_inplace.finetune))
    model.ttt.learning_rate = 0.0  # the config object the TTT layers read
    tokens = random_tokens(model.lm, 19, seed=1)
    with torch.no_grad():
        assert torch.equal(model.lm.forward_text(tokens)[0], plain_model.lm.forward_text(tokens)[0])
        streamed, plain_streamed = stream_lm(model.lm, tokens)[0], stream_lm(plain_model.lm, tokens)[0]
    # W^(0) holds bit-identical values, but moshi's safetensors-loaded weights sit 24 bytes off a
    # 64-byte boundary and the fast weight does not, so BLAS may sum in another order: equal up
    # to float32 rounding, and the sampled tokens and audio below are identical.
    assert (streamed - plain_streamed).abs().max() <= 1e-6
    pcm = read_audio(recordings[1])
    ours = StreamingRunner(model).run(pcm)
    plain = StreamingRunner(plain_model).run(pcm)
    assert ours.pcm.tobytes() == plain.pcm.tobytes()
    assert ours.text_tokens == plain.text_tokens


def test_runner_drives_updates_and_flushes(ttt_model, recordings) -> None:
    runner = StreamingRunner(ttt_model)
    for path in recordings:
        result = runner.run(read_audio(path))
        assert result.steps == result.frames + 1  # the first frame is stepped twice, as moshi does
        assert [r.layer for r in result.ttt_layers] == [1, 3]
        for report in result.ttt_layers:
            assert report.tokens == result.steps
            assert report.updates == math.ceil(result.steps / 8)
            assert report.pending_tokens == 0
            assert report.drift > 0
            assert report.relative_drift == pytest.approx(report.drift / report.norm_initial)


def test_no_ttt_freezes_fast_weights_and_changes_output(ttt_model, recordings) -> None:
    pcm = read_audio(recordings[2])
    adapted = StreamingRunner(ttt_model).run(pcm)
    frozen = StreamingRunner(ttt_model, ttt_enabled=False).run(pcm)
    for report in frozen.ttt_layers:
        assert report.updates == 0 and report.drift == 0.0 and report.pending_tokens == 0
        assert report.tokens == frozen.steps
    # Updates reach the output: the adapted run differs once the first chunk has been applied.
    assert adapted.pcm.tobytes() != frozen.pcm.tobytes()


def test_every_file_starts_from_the_checkpoint_weights(tiny_inplace, ttt_model, recordings) -> None:
    base_weights = load_file(str(tiny_inplace.base / "model.safetensors"))
    for layer in TTTController(ttt_model.lm).layers:
        expected = base_weights[f"transformer.layers.{layer.layer_index}.gating.linear_out.weight"].float()
        assert torch.equal(layer.w_down, expected)  # W^(0) is the base down projection
    runner = StreamingRunner(ttt_model)
    first = runner.run(read_audio(recordings[0]))
    runner.run(read_audio(recordings[2]))
    again = runner.run(read_audio(recordings[0]))
    assert first.pcm.tobytes() == again.pcm.tobytes()
    assert first.text_tokens == again.text_tokens
    assert first.ttt_layers == again.ttt_layers

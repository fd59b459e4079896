"""A tiny, random-weight base Moshi checkpoint and short synthetic recordings, made offline.

The project's loading code reads checkpoints laid out like Kyutai's Hugging Face repos, so the
tiny checkpoint uses exactly that layout, and moshi's own loader
(`moshi.models.loaders.CheckpointInfo.from_hf_repo`) reads it unchanged:

    <out_dir>/
        config.json                       LMModel kwargs + moshi's file-name keys (popped by the loader)
        model.safetensors                 LMModel state_dict (float32; moshi casts on load)
        tokenizer-tiny-mimi.safetensors   MimiModel state_dict, codebooks randomised (see below)
        mimi_config.json                  the small Mimi config (same structure as loaders._mimi_config)
        tokenizer_spm_tiny.model          SentencePiece model trained on a generated English corpus

Everything is random, small (streaming a few seconds of audio takes a fraction of a second on
one CPU thread) and deterministic: the same seed writes byte-identical files.

Why the codebooks need care: a freshly built Mimi has all-zero codebooks
(`EuclideanCodebook.embedding_sum`), so every frame would encode to code 0 and no test could
tell one recording from another. Each codebook is therefore filled with random centroids: randomly
chosen vectors of what that residual stage actually receives from the (random) encoder on
synthetic calibration audio, plus a little noise. That puts the centroids at the scale and in
the region of the encoder output, so different audio maps to different codes.
"""

from __future__ import annotations

import io
import json
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..jobs.files import SAMPLE_RATE
from ..ttt.families import family, family_of

FRAME_RATE = 12.5

# Vocabulary size of the trained tokenizer; the LM's text_card is set to it.
TINY_TEXT_CARD = 256
# Mimi codebook size; the LM's audio card must equal it.
TINY_MIMI_BINS = 128
# Mimi's total number of codebooks. 8 keeps `loaders.get_mimi(None, cfg)` (default
# num_codebooks=8) working; the LM only uses max(dep_q, n_q - dep_q) of them.
TINY_MIMI_N_Q = 8

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-tiny-mimi.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"
TOKENIZER_NAME = "tokenizer_spm_tiny.model"
CONFIG_NAME = "config.json"

LM_GEN_CONFIG: dict[str, float | int] = {"temp": 0.8, "temp_text": 0.7, "top_k": 50, "top_k_text": 25}


def tiny_mimi_config() -> dict[str, tp.Any]:
    """Small Mimi config, same keys as `moshi.models.loaders._mimi_config`.

    sample_rate, frame_rate and the SEANet ratios are Mimi's (8*6*5*4 = 1920 samples per
    80 ms frame) so frame bookkeeping downstream is the real one; only widths shrink.
    """
    seanet_dim = 32
    seanet = {
        "channels": 1,
        "dimension": seanet_dim,
        "causal": True,
        "n_filters": 4,  # widths 4, 8, 16, 32, 64 through the four stages
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    }
    quantizer = {
        "dimension": 16,
        "n_q": TINY_MIMI_N_Q,
        "bins": TINY_MIMI_BINS,
        "input_dimension": seanet_dim,
        "output_dimension": seanet_dim,
    }
    transformer = {
        "d_model": seanet_dim,
        "num_heads": 2,
        "num_layers": 1,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 64,
        "input_dimension": seanet_dim,
        "output_dimensions": [seanet_dim],
    }
    return {
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "frame_rate": FRAME_RATE,
        "seanet": seanet,
        "quantizer": quantizer,
        "transformer": transformer,
    }


def tiny_lm_kwargs(text_card: int = TINY_TEXT_CARD, card: int = TINY_MIMI_BINS) -> dict[str, tp.Any]:
    """LMModel kwargs with the same key set as `moshi.models.loaders._lm_kwargs`, scaled down.

    Four main layers so TTT fine-tunes can sit on at least two of them. n_q = 2 * dep_q as in
    Moshi: the first half is Moshi's own audio, the second half the user's input stream.
    """
    dep_q = 2
    n_q = 2 * dep_q
    depformer_dim = 16
    # Moshi's pattern: text 0, first (semantic) codebook 0, acoustic codebooks 1; same per stream.
    stream_delays = [0] + [1] * (dep_q - 1)
    return {
        "dim": 64,
        "text_card": text_card,
        "existing_text_padding_id": 3,
        "n_q": n_q,
        "dep_q": dep_q,
        "card": card,
        "num_heads": 4,
        "num_layers": 4,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 200,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": depformer_dim,
        "depformer_dim_feedforward": int(4.125 * depformer_dim),
        "depformer_num_heads": 2,
        "depformer_num_layers": 1,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": [0] + stream_delays + stream_delays,
    }


# --------------------------------------------------------------------------- synthetic audio


def _fade(x: np.ndarray, seconds: float = 0.02) -> np.ndarray:
    # Short raised-cosine fades so clips start and end without clicks.
    n = min(int(seconds * SAMPLE_RATE), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _normalise(x: np.ndarray, peak: float) -> np.ndarray:
    return (x * (peak / max(float(np.abs(x).max()), 1e-9))).astype(np.float32)


def _chirp(rng: np.random.Generator, duration: float) -> np.ndarray:
    """Exponential sine sweep over a few octaves."""
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = rng.uniform(120.0, 300.0)
    f1 = rng.uniform(2500.0, 5000.0)
    k = np.log(f1 / f0) / duration
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1.0) / k
    return np.sin(phase)


def _vibrato_tone(rng: np.random.Generator, duration: float) -> np.ndarray:
    """Harmonic tone (decaying partials) with vibrato and a slow tremolo, voice-like."""
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = rng.uniform(110.0, 260.0)
    rate, depth = rng.uniform(4.5, 6.5), rng.uniform(0.02, 0.05)
    inst_f = f0 * (1.0 + depth * np.sin(2 * np.pi * rate * t))
    phase = 2 * np.pi * np.cumsum(inst_f) / SAMPLE_RATE
    x = sum(np.sin(h * phase) / h**1.2 for h in range(1, 9))
    return x * (0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t))


def _bandpass_kernel(low: float, high: float, taps: int = 255) -> np.ndarray:
    # Windowed-sinc band-pass (difference of two low-passes); numpy only, no scipy.
    n = np.arange(taps) - (taps - 1) / 2

    def lowpass(fc: float) -> np.ndarray:
        return 2 * fc / SAMPLE_RATE * np.sinc(2 * fc / SAMPLE_RATE * n)

    return (lowpass(high) - lowpass(low)) * np.hamming(taps)


def _noise_bursts(rng: np.random.Generator, duration: float) -> np.ndarray:
    """Band-passed noise bursts with gaps, each burst in a different band."""
    length = int(duration * SAMPLE_RATE)
    x = np.zeros(length)
    pos = int(rng.uniform(0.02, 0.1) * SAMPLE_RATE)
    while pos < length:
        burst = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
        low = rng.uniform(200.0, 2000.0)
        noise = rng.standard_normal(burst + 254)
        filtered = np.convolve(noise, _bandpass_kernel(low, low * rng.uniform(1.5, 3.0)), mode="valid")
        seg = _fade(filtered[:burst], 0.01)[: length - pos]
        x[pos : pos + len(seg)] = seg
        pos += burst + int(rng.uniform(0.08, 0.25) * SAMPLE_RATE)
    return x


_GENERATORS: list[tuple[str, tp.Callable[[np.random.Generator, float], np.ndarray]]] = [
    ("chirp", _chirp),
    ("vibrato", _vibrato_tone),
    ("noise_bursts", _noise_bursts),
]


def write_sample_recordings(
    out_dir: str | Path, seed: int = 0, durations: tp.Sequence[float] = (1.6, 2.4, 3.0)
) -> list[Path]:
    """Write short 24 kHz mono WAV recordings with distinct synthetic content; return their paths.

    The i-th duration uses the i-th generator (chirp, vibrato tone, noise bursts, cycling).
    """
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, duration in enumerate(durations):
        name, gen = _GENERATORS[i % len(_GENERATORS)]
        rng = np.random.default_rng([seed, i])
        peak = rng.uniform(0.32, 0.48)  # margin so 16-bit rounding stays within 0.3-0.5
        pcm = _normalise(_fade(gen(rng, float(duration))), peak)
        path = out / f"sample_{i:02d}_{name}.wav"
        sf.write(str(path), pcm, SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def _calibration_audio(seed: int, clips_per_kind: int = 3, duration: float = 2.4) -> torch.Tensor:
    """[B, 1, T] batch of varied synthetic clips (plus white noise) to fit codebook scales on."""
    rng = np.random.default_rng([seed, 1_000_003])
    clips = [
        _normalise(_fade(gen(rng, duration)), rng.uniform(0.1, 0.6))
        for _, gen in _GENERATORS
        for _ in range(clips_per_kind)
    ]
    length = len(clips[0])
    clips.append(_normalise(rng.standard_normal(length), 0.3))
    clips.append(_normalise(rng.standard_normal(length), 0.01))  # near-silence
    return torch.from_numpy(np.stack(clips)[:, None, :].astype(np.float32))


# --------------------------------------------------------------------------- Mimi


def _sample_centroids(samples: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` centroids: randomly chosen rows of `samples` [N, D] plus a little Gaussian jitter.

    This is the start of k-means (what Mimi's training does on its first batch) without the
    iterations. Drawing from the data matters: a random encoder's outputs are strongly
    correlated and clustered, and centroids drawn from a fitted Gaussian mostly sat away from
    the data (a recording used ~6-16 codes); data-drawn ones follow its density (~15-30).
    The jitter keeps centroids distinct when a calibration frame repeats (silence, padding).
    """
    n = samples.shape[0]
    if n >= count:
        index = torch.randperm(n, generator=gen)[:count]
    else:
        index = torch.randint(n, (count,), generator=gen)
    jitter = torch.randn(count, samples.shape[1], generator=gen, dtype=samples.dtype)
    return samples[index] + 0.05 * samples.std(0) * jitter


@torch.no_grad()
def _randomise_codebooks(mimi: tp.Any, calibration: torch.Tensor, gen: torch.Generator) -> None:
    """Fill every codebook stage with centroids at the scale of the residual it quantizes.

    Walks the split RVQ as `encode` does: each stage sees the residual left by the previous ones
    (after its rvq's input projection), so its centroids are fitted to that residual.
    """
    from moshi.quantization.core_vq import EuclideanCodebook

    latent = mimi._encode_to_unquantized_latent(calibration)  # [B, D, T] at frame rate
    quantizer = mimi.quantizer
    for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
        residual = rvq.input_proj(latent)
        for layer in rvq.vq.layers:
            book: EuclideanCodebook = layer._codebook
            inputs = layer.project_in(residual.transpose(1, 2)).reshape(-1, book.dim)
            book.embedding_sum.copy_(_sample_centroids(inputs, book.codebook_size, gen))
            book.cluster_usage.fill_(1.0)  # embedding = embedding_sum / cluster_usage
            book._initialized.fill_(1.0)
            book.register_buffer("_embedding", None, persistent=False)  # drop cached centroids
            residual = residual - layer.decode(layer.encode(residual))


# Peak of the decoded calibration audio after `_make_decoder_code_sensitive` (16-bit headroom).
_DECODED_PEAK = 0.5


@torch.no_grad()
def _make_decoder_code_sensitive(mimi: tp.Any, calibration: torch.Tensor) -> None:
    """Make different codes decode to clearly different audio (hundreds of 16-bit LSB apart).

    Left random, the decoder maps every code stream to almost the same waveform: the centroids
    share a large common component (the random encoder's outputs are clustered), and the
    decoder's biases add a code-independent signal, so two random code streams ended up <= 2 LSB
    apart and no audio comparison could tell which tokens the LM chose. Three decode-side-only
    changes (the encoder and the codebooks are untouched, so encoding is unchanged):
    1. each rvq's `output_proj` (used only when decoding) projects out the direction of its
       mean centroid sum, so the decoder sees what differs between codes;
    2. the SEANet decoder's biases are zeroed (no constant waveform);
    3. the last decoder conv is scaled so decoded calibration audio peaks at `_DECODED_PEAK`.
    """
    quantizer = mimi.quantizer
    for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
        mean = sum(layer.project_out(layer._codebook.embedding.mean(0, keepdim=True)) for layer in rvq.vq.layers)[0]
        direction = mean / mean.norm().clamp_min(1e-12)
        projector = torch.eye(direction.numel()) - torch.outer(direction, direction)
        weight = rvq.output_proj.weight  # [out, in, 1] 1x1 conv
        weight.copy_((weight[..., 0] @ projector)[..., None])
    for name, param in mimi.decoder.named_parameters():
        if name.endswith("bias"):
            param.zero_()
    last_conv = mimi.decoder.model[-1].conv.conv
    peak = mimi.decode(mimi.encode(calibration)).abs().max()
    last_conv.weight.mul_(_DECODED_PEAK / peak.clamp_min(1e-12))


def build_tiny_mimi(seed: int = 0) -> tuple[tp.Any, dict[str, tp.Any]]:
    """Random tiny MimiModel (codebooks randomised, decoder code-sensitive, eval mode) and its config."""
    from moshi.models import loaders

    config = tiny_mimi_config()
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, config, device="cpu", num_codebooks=config["quantizer"]["n_q"])
    gen = torch.Generator().manual_seed(seed)
    calibration = _calibration_audio(seed)
    _randomise_codebooks(mimi, calibration, gen)
    _make_decoder_code_sensitive(mimi, calibration)
    return mimi, config


# --------------------------------------------------------------------------- text tokenizer

_SUBJECTS = (
    "I,you,we,they,she,he,my friend,the teacher,our neighbour,your sister,the old man,a young woman,the children".split(
        ","
    )
)
_VERBS = (
    "sees likes finds brings carries wants opens closes paints builds cooks reads writes "
    "remembers forgets follows watches visits buys sells needs hears loves keeps borrows "
    "draws explains fixes hides notices orders plants pulls pushes shares throws catches"
).split()
_ADJECTIVES = (
    "big small old new red blue green yellow quiet loud warm cold bright dark happy heavy "
    "light long short sweet fresh clean busy famous gentle wonderful strange"
).split()
_NOUNS = (
    "apple basket bicycle bird boat book bottle bread bridge cake camera candle car castle "
    "chair cheese clock coat cup door dog cat dream engine flower garden gift horse house "
    "island journey key kitchen lake letter library machine market mountain music ocean "
    "orange paper park pencil picture river road school ship song station stone story "
    "street table town train tree village voice window word anchor blanket butterfly "
    "carpet chimney compass desert feather forest guitar hammer harbour jacket ladder "
    "lantern meadow mirror needle orchard painting planet pocket puzzle rabbit saddle "
    "shadow shelter spoon squirrel stairs sugar thunder tower umbrella valley wagon whistle "
    "autumn balloon biscuit cabinet cottage dolphin elephant envelope festival giraffe "
    "hospital kettle lemon magazine monkey notebook octopus penguin pillow pumpkin rocket "
    "sandwich scissors telescope tomato tunnel violin waterfall yogurt zebra"
).split()
_PLACES = (
    "in the morning,at night,near the river,after dinner,before breakfast,on the hill,"
    "in the kitchen,by the station,under the bridge,every summer,last winter,tomorrow,"
    "yesterday,with a smile,very slowly,quite quickly"
).split(",")


def _corpus(seed: int, count: int = 4000) -> list[str]:
    """Simple English sentences: enough distinct words for a few hundred subword pieces."""
    rng = np.random.default_rng([seed, 7])

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    sentences = []
    for _ in range(count):
        words = [pick(_SUBJECTS), pick(_VERBS), "the", pick(_ADJECTIVES), pick(_NOUNS)]
        if rng.random() < 0.6:
            words.append(pick(_PLACES))
        text = " ".join(words)
        sentences.append(text[0].upper() + text[1:] + pick([".", ".", "?", "!"]))
    return sentences


def train_tiny_tokenizer(seed: int = 0, vocab_size: int = TINY_TEXT_CARD) -> bytes:
    """Serialized SentencePiece unigram model with Moshi's special ids (pad 3 = text padding).

    Sentences are fed through an iterator and the model comes back as bytes, so no temporary
    path ends up recorded in the model's trainer spec (that would break byte-identity).
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="identity",  # skips the ~240 kB NFKC table
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,  # single-threaded training is deterministic
        minloglevel=2,  # the trainer otherwise logs hundreds of lines to stderr
    )
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def _save_state_dict(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Clones: safetensors refuses shared/non-contiguous storage (e.g. tied or sliced weights).
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def write_tiny_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny base checkpoint into out_dir (created), return out_dir as Path."""
    import sentencepiece as spm
    from moshi.models.lm import LMModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_bytes = train_tiny_tokenizer(seed)
    (out / TOKENIZER_NAME).write_bytes(tokenizer_bytes)
    text_card = spm.SentencePieceProcessor(model_proto=tokenizer_bytes).get_piece_size()

    mimi, mimi_config = build_tiny_mimi(seed)
    _save_state_dict(mimi, out / MIMI_NAME)
    (out / MIMI_CONFIG_NAME).write_text(json.dumps(mimi_config, indent=2) + "\n")

    lm_kwargs = tiny_lm_kwargs(text_card=text_card, card=mimi_config["quantizer"]["bins"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LMModel(device="cpu", dtype=torch.float32, **lm_kwargs)
    _save_state_dict(lm, out / MOSHI_NAME)

    config = {
        **lm_kwargs,
        "moshi_name": MOSHI_NAME,
        "mimi_name": MIMI_NAME,
        "tokenizer_name": TOKENIZER_NAME,
        "mimi_config_name": MIMI_CONFIG_NAME,
        "model_type": "moshi",
        "lm_gen_config": dict(LM_GEN_CONFIG),
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


# -- TTT fine-tunes ------------------------------------------------------------------------------
#
# Laid out the way the research training code writes them, so `--checkpoint` loading is tested
# on the real layouts:
#
#   <dir>/base/                                     the tiny base above
#   <dir>/inplace/checkpoints/checkpoint_000100/consolidated/
#       config.json        base LM config + `ttt_config` (moshi_in_place) + yarn/lora keys
#       lora.safetensors   target generators only (conv1d.conv.weight, W_target.weight), bf16
#   <dir>/ttt-mlp/checkpoints/checkpoint_000100/consolidated/
#       config.json        the LM config
#       training_config.json   training args with the `ttt` section (moshi-finetune)
#       lora.safetensors   TTT-MLP block weights, bf16
#
# Options for either family: `yarn` adds `yarn_config` to the fine-tune's config.json, `lora` adds
# `lora_A`/`lora_B` adapters for every linear layer to lora.safetensors (with `lora`, `lora_rank`,
# `lora_scaling` in config.json), as moshi-finetune saves them.

FINETUNE_STEP_DIR = Path("checkpoints") / "checkpoint_000100" / "consolidated"

# make-tiny's YaRN option: the settings the training code saves (`train.py` writes every key),
# at scale 4 (context 200 -> 800). `original_max_seq_len` 25 (2 s of frames) puts the ramp over
# the tiny model's 16-dim heads (wavelengths 6 .. 20,000 tokens), so most frequencies change.
TINY_YARN = {
    "enabled": True,
    "scale": 4.0,
    "original_max_seq_len": 25,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
}
# make-tiny's LoRA option: rank and scaling written to config.json as moshi-finetune does.
TINY_LORA = {"lora_rank": 4, "lora_scaling": 2.0}
TINY_LORA_STD = 0.05


@dataclass
class TinyPaths:
    base: Path
    finetune: Path  # the run folder; loaders take the latest checkpoint below it


def write_tiny_variant(
    root: str | Path,
    variant: str,
    seed: int = 0,
    *,
    yarn: dict | None = None,
    lora: bool = False,
    name: str | None = None,
    ttt: tp.Mapping[str, tp.Any] | None = None,
) -> TinyPaths:
    """Write `root/base` and `root/<name or variant>`: a fine-tune of it in its family's research
    layout. `yarn` adds a `yarn_config` to the fine-tune's LM config; `lora` adds LoRA adapters
    (`lora_A`/`lora_B` for every linear layer, TTT layers' included, as moshi-finetune wraps
    them) beside the TTT tensors, with `lora`, `lora_rank`, `lora_scaling` in config.json. `ttt`
    replaces keys of the family's TTT section (e.g. `{"use_rope": True}` for TTT-MLP)."""
    from .layouts import LOADER_KEYS

    ttt_family = family(variant)
    root = Path(root)
    run = root / (name or variant)
    base = write_tiny_base(root / "base", seed=seed)
    folder = run / FINETUNE_STEP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lm_config = {k: v for k, v in json.loads((base / CONFIG_NAME).read_text()).items() if k not in LOADER_KEYS}
    section = {**ttt_family.tiny_section, **(ttt or {})}
    ttt_family.write_tiny_config(folder, lm_config, section, run, seed)
    if yarn is not None or lora:
        # Both are LM settings: they go into the fine-tune's LM config (config.json), whatever the family.
        config = json.loads((folder / CONFIG_NAME).read_text())
        if yarn is not None:
            config["yarn_config"] = dict(yarn)
        if lora:
            config.update(lora=True, **TINY_LORA)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    _save_finetune_weights(base, folder, section, seed, lora)
    return TinyPaths(base=base, finetune=run)


def _save_finetune_weights(base: Path, folder: Path, section: dict, seed: int, lora: bool = False) -> None:
    """Random TTT tensors with exactly the names and shapes our loader expects for the config
    just written to `folder`, saved as its `lora.safetensors` (bf16, as the training code saves);
    with `lora`, random adapters for every linear layer of the TTT model too."""
    from safetensors.torch import save_file

    from .layouts import find_ttt_config
    from .model import load_model

    lm = load_model(str(base)).lm
    config, _ = find_ttt_config(folder, len(lm.transformer.layers))
    assert config is not None
    ttt_family = family_of(config)
    base_keys = set(lm.state_dict())
    ttt_family.attach(lm, config)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {
        name: ttt_family.tiny_tensor(name, tuple(param.shape), section, gen).to(torch.bfloat16).contiguous()
        for name, param in lm.named_parameters()
        if name not in base_keys
    }
    if lora:
        tensors.update(_lora_adapters(lm, TINY_LORA["lora_rank"], torch.Generator().manual_seed(seed + 2)))
    save_file(tensors, str(folder / "lora.safetensors"))


def _lora_adapters(lm: torch.nn.Module, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """`<linear>.lora_A.weight` [rank, in] and `.lora_B.weight` [out, rank] for every linear, bf16.
    Both random (training starts B at zero; a trained one is not), so merging changes outputs."""
    out = {}
    for name, module in lm.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes = {"lora_A": (rank, module.in_features), "lora_B": (module.out_features, rank)}
            for half, shape in shapes.items():
                out[f"{name}.{half}.weight"] = (torch.randn(shape, generator=gen) * TINY_LORA_STD).to(torch.bfloat16)
    return out

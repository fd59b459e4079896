"""The tiny random base checkpoint loads through moshi's own loader and behaves like a real one."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi reads it at
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import soundfile as sf
import sphn
import torch
from moshi.models import loaders
from moshi.run_inference import InferenceState
from safetensors.torch import load_file

from helpers import block_hub
from moshi_ttt.checkpoints import tiny

torch.set_num_threads(1)

FILE_KEYS = {"moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "model_type", "lm_gen_config"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_tiny_base(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny.write_sample_recordings(tmp_path_factory.mktemp("recs"), seed=0)


def _config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())


def _load(base: Path, monkeypatch: pytest.MonkeyPatch):
    block_hub(monkeypatch)  # everything must come from the folder
    cfg = _config(base)
    info = loaders.CheckpointInfo.from_hf_repo(
        "local",
        moshi_weights=base / cfg["moshi_name"],
        mimi_weights=base / cfg["mimi_name"],
        tokenizer=base / cfg["tokenizer_name"],
        config_path=base / "config.json",
        mimi_config_path=base / cfg["mimi_config_name"],
    )
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    return info, mimi, lm, info.get_text_tokenizer()


def _read(path: Path) -> torch.Tensor:
    pcm, _ = sphn.read(str(path), sample_rate=24000)
    return torch.from_numpy(pcm)[None, 0:1]  # [1, 1, T]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(base: Path, tmp_path: Path) -> None:
    again = _files(tiny.write_tiny_base(tmp_path / "again", seed=0))
    first = _files(base)
    assert set(first) == set(again)
    for name in first:
        assert first[name] == again[name], name

    other = tiny.write_tiny_base(tmp_path / "other", seed=1)
    for name in ("model.safetensors", tiny.MIMI_NAME):
        a, b = load_file(str(base / name)), load_file(str(other / name))
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].dtype.is_floating_point), name


def test_recordings_deterministic_and_distinct(recordings: list[Path], tmp_path: Path) -> None:
    again = tiny.write_sample_recordings(tmp_path, seed=0, durations=(1.6, 2.4, 3.0))
    assert [p.read_bytes() for p in recordings] == [p.read_bytes() for p in again]
    assert len({p.name for p in recordings}) == 3

    spectra = []
    for path, duration in zip(recordings, (1.6, 2.4, 3.0)):
        pcm, sr = sf.read(str(path), dtype="float32")
        assert sr == 24000 and pcm.ndim == 1
        assert len(pcm) == int(duration * 24000)
        assert 0.3 <= np.abs(pcm).max() <= 0.5
        spectrum = np.abs(np.fft.rfft(pcm[: 24000 + 14400]))[:8000]
        spectra.append(spectrum / np.linalg.norm(spectrum))
    # Distinct content: long-term spectra are far from each other.
    for i in range(3):
        for j in range(i + 1, 3):
            assert float(spectra[i] @ spectra[j]) < 0.8

    other = tiny.write_sample_recordings(tmp_path / "seed1", seed=1)
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(recordings, other))


def test_layout_and_config_keys(base: Path) -> None:
    cfg = _config(base)
    for key in FILE_KEYS:
        assert key in cfg
    assert cfg["model_type"] == "moshi"
    assert cfg["moshi_name"] == "model.safetensors"
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (base / cfg[key]).is_file(), key
    # Everything but the file keys goes to LMModel(**kwargs): same key set as moshi's own 7B config.
    lm_keys = set(cfg) - FILE_KEYS
    assert lm_keys == set(loaders._lm_kwargs)
    assert not any("lora" in key for key in cfg)
    assert cfg["n_q"] == 2 * cfg["dep_q"]
    assert len(cfg["delays"]) == cfg["n_q"] + 1
    assert cfg["num_layers"] >= 4

    mimi_cfg = json.loads((base / cfg["mimi_config_name"]).read_text())
    assert set(mimi_cfg) == set(loaders._mimi_config)
    for section in ("seanet", "quantizer", "transformer"):
        assert set(mimi_cfg[section]) == set(loaders._mimi_config[section]), section
    assert mimi_cfg["sample_rate"] == 24000 and mimi_cfg["frame_rate"] == 12.5
    # Mimi's encoder hop (960 samples, 25 Hz) then a 2x downsample to 12.5 Hz: 1920 per frame.
    assert mimi_cfg["seanet"]["ratios"] == [8, 6, 5, 4]
    assert mimi_cfg["sample_rate"] / mimi_cfg["frame_rate"] == 1920
    assert cfg["card"] == mimi_cfg["quantizer"]["bins"]
    assert mimi_cfg["quantizer"]["n_q"] >= max(cfg["dep_q"], cfg["n_q"] - cfg["dep_q"])


def test_tokenizer_fits_text_card(base: Path) -> None:
    cfg = _config(base)
    sp = sentencepiece.SentencePieceProcessor(str(base / cfg["tokenizer_name"]))
    assert sp.get_piece_size() <= cfg["text_card"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    text = "The teacher reads the old book in the morning."
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert len(ids) < len(text) / 2  # learned word pieces, not just characters


def test_loads_with_moshi_loader_offline(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info, mimi, lm, tok = _load(base, monkeypatch)
    assert info.lm_gen_config == tiny.LM_GEN_CONFIG
    assert lm.text_card == tok.get_piece_size()
    assert lm.card == mimi.cardinality
    assert mimi.num_codebooks == max(lm.dep_q, lm.n_q - lm.dep_q)
    assert mimi.frame_size == 1920
    # The weights are the saved ones (not a fresh init).
    saved = load_file(str(base / "model.safetensors"))
    state = lm.state_dict()
    assert saved.keys() == state.keys()
    for key in saved:
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
    # Codebooks are randomised, not Mimi's all-zero init.
    books = [m for m in mimi.modules() if type(m).__name__ == "EuclideanCodebook"]
    assert len(books) == tiny.TINY_MIMI_N_Q
    for book in books:
        assert book.initialized
        assert book.embedding.std(0).min() > 0


@torch.no_grad()
def test_mimi_codes_differ_between_recordings(base: Path, recordings: list[Path], monkeypatch) -> None:
    _, mimi, _, _ = _load(base, monkeypatch)
    codes = [mimi.encode(_read(path))[0] for path in recordings]  # [K, T] each
    frames = min(c.shape[-1] for c in codes)
    for i in range(len(codes)):
        for j in range(i + 1, len(codes)):
            differing = (codes[i][:, :frames] != codes[j][:, :frames]).float().mean()
            assert differing > 0.5, (i, j)
    for c in codes:
        assert all(len(set(row.tolist())) >= 8 for row in c)  # within one recording, per codebook
    distinct = set(torch.cat([c.flatten() for c in codes]).tolist())
    assert len(distinct) > 40


@torch.no_grad()
def test_mimi_decoder_tells_codes_apart(base: Path, recordings: list[Path], monkeypatch) -> None:
    """Outputs are compared as audio, so which codes the LM chose must show in the waveform: any
    one codebook changed must move the decoded audio by hundreds of 16-bit LSB, while the
    decoded recordings stay within 16-bit range."""
    _, mimi, _, _ = _load(base, monkeypatch)
    codes = [mimi.encode(_read(path)) for path in recordings]
    frames = min(c.shape[-1] for c in codes)
    a, b = codes[0][..., :frames], codes[1][..., :frames]
    reference = mimi.decode(a)
    assert reference.abs().max() < 0.9
    lsb = 1 / 32768
    for k in range(a.shape[1]):
        one_changed = a.clone()
        one_changed[:, k] = b[:, k]
        moved = (mimi.decode(one_changed) - reference).abs()
        assert moved.mean() > 100 * lsb, (k, float(moved.mean() / lsb))
    random_codes = torch.randint(0, mimi.cardinality, a.shape, generator=torch.Generator().manual_seed(0))
    assert (mimi.decode(random_codes) - reference).abs().mean() > 300 * lsb


@torch.no_grad()
def test_inference_state_streams_tiny_checkpoint(base: Path, recordings: list[Path], monkeypatch) -> None:
    info, mimi, lm, tok = _load(base, monkeypatch)
    pcm = _read(recordings[-1])  # 3.0 s
    state = InferenceState(info, mimi, tok, lm, batch_size=1, cfg_coef=1.0, device="cpu", **info.lm_gen_config)
    ((text, out_pcm),) = state.run(pcm)
    frames = pcm.shape[-1] // 1920
    # Every full frame yields one step; the delay of 1 costs one step of output.
    assert text.shape == (frames,)
    assert out_pcm.shape == (1, frames * 1920)
    assert torch.isfinite(out_pcm).all() and out_pcm.abs().max() > 0
    assert int(text.max()) < lm.text_card


def test_tokenizer_corpus_has_headroom_above_the_text_card() -> None:
    """sentencepiece's largest trainable vocabulary for one corpus differs between the versions
    our pins admit (0.2.2 allowed 21 pieces fewer than 0.2.3, and refused 256 on the old corpus):
    the corpus must leave room well above TINY_TEXT_CARD on whatever version is installed."""
    model = tiny.train_tiny_tokenizer(seed=0, vocab_size=tiny.TINY_TEXT_CARD + 40)
    assert sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size() == tiny.TINY_TEXT_CARD + 40

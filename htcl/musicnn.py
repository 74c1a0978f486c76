"""PyTorch port of musicnn (Pons & Serra 2019) with its pretrained weights, numerically identical
to the original TensorFlow code (eval mode: batch norm with moving statistics, dropout off).

The pretrained weights are the TensorFlow checkpoints that the PyPI wheel ``musicnn==0.1.0``
ships (``pip install --no-deps musicnn==0.1.0``; importing that package pulls no TensorFlow). They
are read here with numpy alone (:func:`read_tf_checkpoint`); nothing is downloaded at run time.

Pipeline (musicnn's ``extractor``): waveform at 16 kHz -> :func:`log_mel` (librosa's Mel power,
n_fft 512, hop 256, 96 bands, rounded to float16, ``log10(10000 x + 1)``) -> :func:`patches`
(non-overlapping 187-frame patches, ~3 s) -> :class:`Musicnn` (musically motivated front-end CNN,
dense mid end, temporal max/mean pooling, dense back end, 50 tags).

Facts of the original that the port reproduces (checked against TF by tests/test_musicnn.py):

* TF batch norm uses epsilon 1e-3; some moving variances are ~1e-36, so the scale is
  ``gamma / sqrt(1e-3)`` there, not huge.
* Each conv block is conv -> ReLU -> batch norm (ReLU *before* BN) -> max over frequency.
* TF "same" padding of the temporal convs (kernel 128/64/32 in time) puts the extra row at the
  end: (63, 64), (31, 32), (15, 16).
* The pooled features interleave max and mean per channel: [max_0, mean_0, max_1, mean_1, ...].
* Kernels are stored HWIO with H = time.
* Many front-end filters are dead (all weights ~1e-31): their output is a constant
  ``a * relu(bias) + b`` after batch norm. They are not convolved here (the constant is exact to
  float precision), and their contribution to the first mid-end conv is precomputed. This and
  taking the max over frequency *before* the ReLU and the per-channel BN affine (which commute with
  a max when the BN scale is >= 0; channels with a negative scale are convolved with negated
  weights so that a max still gives the right value) is what makes the port cheaper than TF.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MUSICNN_MODELS = {"musicnn_msd": "MSD_musicnn", "musicnn_mtt": "MTT_musicnn"}
SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
PATCH_FRAMES = 187
N_FRONTEND = 561  # 204 + 204 timbral + 3 * 51 temporal channels
N_MIDEND = 64
POOLED_DIM = 2 * (N_FRONTEND + 3 * N_MIDEND)  # 1506: max and mean of 753 channels, interleaved
PENULTIMATE_DIM = 200
BN_EPS = 1e-3  # TF's default batch-norm epsilon
_CHUNK = 256  # frames per block of the log-Mel
_TBLOCK = 48  # frames per GEMM block of the temporal convs
# A front-end filter is skipped ("dead") when an input of magnitude <= _IN_MAX (the batch-normalised
# log-Mel; musicnn's log-Mel is <= ~9, normalised <= ~5) moves its BN output by less than _DEAD.
# Most such filters have weights ~1e-31; a few have ~1e-9. The exact output is then the constant
# a * relu(bias) + b, to well below float32 rounding of the outputs (~1e-5).
_IN_MAX = 10.0
_DEAD = 1e-6

# musicnn.configuration, copied so the tag names need no import of the package
MTT_LABELS = [
    "guitar",
    "classical",
    "slow",
    "techno",
    "strings",
    "drums",
    "electronic",
    "rock",
    "fast",
    "piano",
    "ambient",
    "beat",
    "violin",
    "vocal",
    "synth",
    "female",
    "indian",
    "opera",
    "male",
    "singing",
    "vocals",
    "no vocals",
    "harpsichord",
    "loud",
    "quiet",
    "flute",
    "woman",
    "male vocal",
    "no vocal",
    "pop",
    "soft",
    "sitar",
    "solo",
    "man",
    "classic",
    "choir",
    "voice",
    "new age",
    "dance",
    "male voice",
    "female vocal",
    "beats",
    "harp",
    "cello",
    "no voice",
    "weird",
    "country",
    "metal",
    "female voice",
    "choral",
]
MSD_LABELS = [
    "rock",
    "pop",
    "alternative",
    "indie",
    "electronic",
    "female vocalists",
    "dance",
    "00s",
    "alternative rock",
    "jazz",
    "beautiful",
    "metal",
    "chillout",
    "male vocalists",
    "classic rock",
    "soul",
    "indie rock",
    "Mellow",
    "electronica",
    "80s",
    "folk",
    "90s",
    "chill",
    "instrumental",
    "punk",
    "oldies",
    "blues",
    "hard rock",
    "ambient",
    "acoustic",
    "experimental",
    "female vocalist",
    "guitar",
    "Hip-Hop",
    "70s",
    "party",
    "country",
    "easy listening",
    "sexy",
    "catchy",
    "funk",
    "electro",
    "heavy metal",
    "Progressive rock",
    "60s",
    "rnb",
    "indie pop",
    "sad",
    "House",
    "happy",
]
_LABELS = {"MSD_musicnn": MSD_LABELS, "MTT_musicnn": MTT_LABELS}


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------


def checkpoint_prefix(name: str) -> Path:
    """The checkpoint prefix of model `name` ("musicnn_msd" / "musicnn_mtt") inside the installed
    musicnn package. Its files are the dotfiles ``<dir>/.index`` and ``<dir>/.data-00000-of-00001``
    (the prefix is "<folder>/"; :func:`read_tf_checkpoint` accepts the folder; the folder's
    ``checkpoint`` file names the author's machine and is not used)."""
    if name not in MUSICNN_MODELS:
        raise ValueError(f"unknown musicnn model {name!r}; known: {sorted(MUSICNN_MODELS)}")
    import importlib.util

    spec = importlib.util.find_spec("musicnn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the pretrained musicnn weights come from the musicnn package: "
            "install with pip install --no-deps musicnn==0.1.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / MUSICNN_MODELS[name]
    if not (folder / ".index").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {folder}/.index: reinstall with pip install --no-deps musicnn==0.1.0"
        )
    return folder


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _sstable_block(data: bytes, offset: int, size: int):
    """Yield (key, value) of one leveldb table block (prefix-compressed keys, restart array)."""
    if data[offset + size] != 0:
        raise ValueError("compressed SSTable blocks are not supported (TF bundles are uncompressed)")
    blk = data[offset : offset + size]
    n_restarts = struct.unpack_from("<I", blk, len(blk) - 4)[0]
    end = len(blk) - 4 - 4 * n_restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(blk, pos)
        non_shared, pos = _varint(blk, pos)
        vlen, pos = _varint(blk, pos)
        key = key[:shared] + blk[pos : pos + non_shared]
        pos += non_shared
        yield key, blk[pos : pos + vlen]
        pos += vlen


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 10: np.bool_, 19: np.float16}


def read_tf_checkpoint(prefix) -> dict[str, np.ndarray]:
    """Read a TF2 tensor bundle (``prefix + ".index"``, ``prefix + ".data-00000-of-00001"``) into
    numpy arrays, with numpy alone. The .index is a leveldb-style SSTable whose values are
    BundleEntryProto messages (dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6); the
    empty key holds the BundleHeaderProto."""
    prefix = str(prefix) + ("/" if Path(prefix).is_dir() else "")  # musicnn's prefix is "<folder>/"
    data = Path(prefix + ".index").read_bytes()
    footer = data[-48:]
    if struct.unpack("<Q", footer[-8:])[0] != 0xDB4775248B80FB57:
        raise ValueError(f"{prefix}.index is not an SSTable")
    pos = 0
    for _ in range(2):  # skip the metaindex handle
        _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    shards: dict[int, bytes] = {}
    n_shards = 1
    out: dict[str, np.ndarray] = {}
    for _, handle in _sstable_block(data, index_offset, index_size):
        block_offset, p = _varint(handle, 0)
        block_size, _ = _varint(handle, p)
        for key, value in _sstable_block(data, block_offset, block_size):
            if not key:  # BundleHeaderProto
                n_shards = dict((f, v) for f, _, v in _fields(value)).get(1, 1)
                continue
            dtype, dims, shard, offset, size = 1, [], 0, 0, 0
            for field, _, v in _fields(value):
                if field == 1:
                    dtype = v
                elif field == 2:  # TensorShapeProto
                    for f2, _, d in _fields(v):
                        if f2 == 2:  # Dim
                            dims.append(dict((f3, x) for f3, _, x in _fields(d)).get(1, 0))
                elif field == 3:
                    shard = v
                elif field == 4:
                    offset = v
                elif field == 5:
                    size = v
                elif field == 7:
                    raise ValueError(f"sliced variable {key!r} is not supported")
            if shard not in shards:
                shards[shard] = Path(f"{prefix}.data-{shard:05d}-of-{n_shards:05d}").read_bytes()
            np_dtype = np.dtype(_TF_DTYPES[dtype]).newbyteorder("<")
            arr = np.frombuffer(shards[shard], np_dtype, size // np_dtype.itemsize, offset)
            out[key.decode()] = arr.reshape(dims).astype(np_dtype.newbyteorder("="))
    return out


# ----------------------------------------------------------------------------------------------
# front end: log-Mel
# ----------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # librosa's Slaney scale
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
    mels = f / f_sp
    log_t = f >= min_log_hz
    mels[log_t] = min_log_mel + np.log(f[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
    freqs = f_sp * m
    log_t = m >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (m[log_t] - min_log_mel))
    return freqs


@lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
    """(96, 257) float32, equal to librosa.filters.mel(sr=16000, n_fft=512, n_mels=96) (Slaney)."""
    n_bins = 1 + N_FFT // 2
    weights = np.zeros((N_MELS, n_bins), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    mel_f = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], N_MELS + 2)
    )
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(N_MELS):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights


@lru_cache(maxsize=None)
def _frontend_consts() -> tuple[Tensor, Tensor, int, int]:
    fb = torch.from_numpy(mel_filterbank())
    nz = fb.abs().sum(0).nonzero().flatten()  # the Mel bank ignores some bins (Nyquist, ...)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    # periodic Hann (scipy.signal.get_window("hann", 512, fftbins=True)), in float64 as librosa has it
    window = torch.from_numpy(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))
    return window, fb[:, lo:hi].T.contiguous(), lo, hi


def _round_float16(x: Tensor) -> Tensor:
    """Round float32 values to the nearest float16 (ties to even), as numpy's astype(float16) does,
    but without overflow: values above float16's range keep 11 significant bits instead of
    becoming inf (musicnn's own code gives inf there, and NaN tags)."""
    small = x <= 65504.0
    if bool(small.all()):
        return x.half().float()
    bits = x.view(torch.int32)
    big = ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    return torch.where(small, x.half().float(), big)


def mel_power(waveform) -> Tensor:
    """(T,) or (B, T) float waveform at 16 kHz -> (B, F, 96) float32 Mel power as librosa's
    ``melspectrogram(y, sr=16000, n_fft=512, hop_length=256, n_mels=96)`` (center=True, zero
    padding as librosa >= 0.10, periodic Hann, power 2), F = 1 + T // 256. The FFT runs in float64
    and is rounded to complex64, as librosa does with numpy's FFT."""
    x = torch.as_tensor(waveform)
    if x.dim() == 1:
        x = x[None]
    x = x.to(torch.float32)
    window, fb, lo, hi = _frontend_consts()
    frames = F.pad(x, (N_FFT // 2, N_FFT // 2)).unfold(-1, N_FFT, HOP)  # (B, F, 512) float32 view
    out = x.new_empty(frames.shape[0], frames.shape[1], N_MELS)
    # blocks of _CHUNK frames keep the float64 intermediates in cache, so that a batch costs the
    # same per song as one song
    for i in range(frames.shape[0]):
        for s in range(0, frames.shape[1], _CHUNK):
            spec = torch.fft.rfft(frames[i, s : s + _CHUNK].double() * window, dim=-1)[..., lo:hi]
            torch.matmul(spec.to(torch.complex64).abs().square(), fb, out=out[i, s : s + _CHUNK])
    return out


def log_mel(waveform) -> Tensor:
    """(T,) or (B, T) float waveform at 16 kHz -> (B, F, 96) musicnn's log-Mel:
    ``log10(10000 * float16(mel_power) + 1)`` (musicnn.extractor.batch_data), with the float16
    rounding done without overflow (see :func:`_round_float16`). Batched songs share T."""
    return torch.log10(10000.0 * _round_float16(mel_power(waveform)) + 1.0)


def patches(mel: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
    """(B, F, 96) log-Mel -> non-overlapping 187-frame patches (B, P, 187, 96) and a (B, P) bool
    mask of the real ones.

    As musicnn, a tail shorter than a patch is dropped (song b has ``F_b // 187`` patches). musicnn
    itself fails on a song shorter than one patch (< 187 frames, about 2.98 s); here such a song is
    repeat-padded (its frames tiled in time, the "repeat-pad" musicnn was trained with) to one full
    patch. `lengths` (B,) gives each song's frame count when the batch was padded to a common F;
    patches beyond a song's count are zeros with mask False."""
    if mel.dim() == 2:
        mel = mel[None]
    b, f, m = mel.shape
    lens = torch.full((b,), f, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().cpu()
    if int(lens.max()) > f:
        raise ValueError("a length exceeds the number of frames")
    n = torch.clamp(lens // PATCH_FRAMES, min=1)
    p = int(n.max())
    if f >= p * PATCH_FRAMES:
        out = mel[:, : p * PATCH_FRAMES].reshape(b, p, PATCH_FRAMES, m).clone()
    else:
        out = mel.new_zeros(b, p, PATCH_FRAMES, m)
    for i in range(b):
        li = int(lens[i])
        if li < PATCH_FRAMES:
            if li == 0:
                raise ValueError("a song with no frame")
            reps = -(-PATCH_FRAMES // li)
            out[i, 0] = mel[i, :li].repeat(reps, 1)[:PATCH_FRAMES]
    mask = torch.arange(p)[None, :] < n[:, None]
    out[~mask] = 0
    return out, mask


# ----------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------


def _bn_affine(w: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode TF batch norm as y = a x + b (float64 while folding)."""
    g = w[f"{name}/gamma"].astype(np.float64)
    beta = w[f"{name}/beta"].astype(np.float64)
    a = g / np.sqrt(w[f"{name}/moving_variance"].astype(np.float64) + BN_EPS)
    return a, beta - w[f"{name}/moving_mean"].astype(np.float64) * a


class _MaxBlock(nn.Module):
    """conv (1 input channel, HWIO kernel, H = time) -> ReLU -> BN -> max over frequency, for the
    live filters only; output (N, C_all, T) with the dead filters' constants filled in."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, a: np.ndarray, b: np.ndarray, pad: tuple[int, int]):
        super().__init__()
        kh, kw, _, c = kernel.shape
        # dead: even an input of magnitude _IN_MAX moves the BN output by less than _DEAD
        alive = np.abs(kernel).reshape(-1, c).sum(0) * np.abs(a) * _IN_MAX > _DEAD
        sign = np.where(a >= 0, 1.0, -1.0)  # max(a z) = a max(z) for a >= 0, = -a max(-z) otherwise
        w = (kernel[:, :, 0, :].transpose(2, 0, 1) * sign[:, None, None])[alive][:, None]  # (C, 1, kh, kw)
        self.pad = pad
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        self.register_buffer("bias", torch.from_numpy((bias * sign)[alive].astype(np.float32)))
        self.register_buffer("sign", torch.from_numpy(sign[alive].astype(np.float32)))
        self.register_buffer("a", torch.from_numpy(a[alive].astype(np.float32)))
        self.register_buffer("b", torch.from_numpy(b[alive].astype(np.float32)))
        self.register_buffer("alive", torch.from_numpy(alive))
        const = a * np.maximum(bias.astype(np.float64), 0) + b  # dead filter: conv output = bias
        self.register_buffer("const", torch.from_numpy(const.astype(np.float32)))
        self.n_out = c

    def forward(self, x: Tensor) -> Tensor:  # x (N, 1, T, 96), already batch-normalised
        xp = F.pad(x, (0, 0, *self.pad))
        n, _, t_pad, _ = xp.shape
        kh, kw = self.weight.shape[2:]
        t = t_pad - kh + 1
        c = self.weight.shape[0]
        m = xp.new_empty(n, c, t)  # max over frequency of sign * (conv + bias)
        # One patch (or a block of frames) at a time: the conv output before the max is large
        # (C x T x 96) and this keeps it in cache (~1.5-3x faster than one big call).
        if kw > 1 or kh > 64:
            for i in range(n):
                m[i] = F.conv2d(xp[i : i + 1], self.weight, self.bias)[0].amax(dim=2)
        else:  # a temporal (kh x 1) kernel: a GEMM over time windows, frequency as rows
            w = self.weight.view(c, kh).t()
            for i in range(n):
                for s in range(0, t, _TBLOCK):
                    e = min(s + _TBLOCK, t)
                    win = xp[i, 0, s : e + kh - 1].unfold(0, kh, 1)  # (e - s, 96, kh)
                    z = torch.addmm(self.bias, win.reshape(-1, kh), w).view(e - s, -1, c)
                    m[i, :, s:e] = z.amax(dim=1).t()
        return self.a[:, None] * torch.relu(m * self.sign[:, None]) + self.b[:, None]


class MusicnnBackend(nn.Module):
    """musicnn's back end after the temporal pooling: BN -> dense -> ReLU -> BN (penultimate) ->
    dense (logits). Dropout (0.5, train only) is left out: eval semantics. Trainable (torch batch
    norm with TF's epsilon 1e-3 and momentum 0.99 as TF counts it)."""

    def __init__(self, n_tags: int, pooled_dim: int = POOLED_DIM, units: int = PENULTIMATE_DIM):
        super().__init__()
        self.bn_pool = nn.BatchNorm1d(pooled_dim, eps=BN_EPS, momentum=0.01)
        self.dense = nn.Linear(pooled_dim, units)
        self.bn_dense = nn.BatchNorm1d(units, eps=BN_EPS, momentum=0.01)
        self.out = nn.Linear(units, n_tags)

    def penultimate(self, pooled: Tensor) -> Tensor:
        return self.bn_dense(torch.relu(self.dense(self.bn_pool(pooled))))

    def logits(self, penultimate: Tensor) -> Tensor:
        return self.out(penultimate)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.logits(self.penultimate(pooled))

    def load_tf(self, w: dict) -> None:
        with torch.no_grad():
            for bn, name in ((self.bn_pool, "batch_normalization_9"), (self.bn_dense, "batch_normalization_10")):
                bn.weight.copy_(torch.from_numpy(w[f"{name}/gamma"]))
                bn.bias.copy_(torch.from_numpy(w[f"{name}/beta"]))
                bn.running_mean.copy_(torch.from_numpy(w[f"{name}/moving_mean"]))
                bn.running_var.copy_(torch.from_numpy(w[f"{name}/moving_variance"]))
            for lin, name in ((self.dense, "dense"), (self.out, "dense_1")):
                lin.weight.copy_(torch.from_numpy(w[f"{name}/kernel"].T.copy()))
                lin.bias.copy_(torch.from_numpy(w[f"{name}/bias"]))


class Musicnn(nn.Module):
    """musicnn (MSD_musicnn / MTT_musicnn), eval-mode semantics for the front and mid end (frozen
    buffers with the batch norms folded); ``self.backend`` (:class:`MusicnnBackend`) is an ordinary
    trainable module. Put the model in eval() (the constructor does) for musicnn's outputs."""

    def __init__(self, name: str = "musicnn_msd", pretrained: bool = True):
        super().__init__()
        if name not in MUSICNN_MODELS:
            raise ValueError(f"unknown musicnn model {name!r}; known: {sorted(MUSICNN_MODELS)}")
        self.name = name
        self.tags: list[str] = list(_LABELS[MUSICNN_MODELS[name]])
        self.backend = MusicnnBackend(len(self.tags))
        if pretrained:
            w = read_tf_checkpoint(checkpoint_prefix(name))
        else:  # random weights of the right shapes (for tests of plumbing only)
            w = _random_weights(len(self.tags))
        self._load(w)
        self.eval()

    # -- weights --------------------------------------------------------------------------------
    def _load(self, w: dict) -> None:
        a0, b0 = _bn_affine(w, "batch_normalization")
        self.in_a, self.in_b = float(a0[0]), float(b0[0])
        blocks = []
        for conv, bn, pad in (
            ("conv2d", "batch_normalization_1", (3, 3)),
            ("conv2d_1", "batch_normalization_2", (3, 3)),
            ("conv2d_2", "batch_normalization_3", (63, 64)),
            ("conv2d_3", "batch_normalization_4", (31, 32)),
            ("conv2d_4", "batch_normalization_5", (15, 16)),
        ):
            a, b = _bn_affine(w, bn)
            blocks.append(_MaxBlock(w[f"{conv}/kernel"], w[f"{conv}/bias"], a, b, pad))
        self.blocks = nn.ModuleList(blocks)
        # mid end: three conv1d (kernel 7 in time, "valid" on 3+3 zero padding), ReLU, BN
        for i, (conv, bn) in enumerate(
            (
                ("conv2d_5", "batch_normalization_6"),
                ("conv2d_6", "batch_normalization_7"),
                ("conv2d_7", "batch_normalization_8"),
            )
        ):
            k = w[f"{conv}/kernel"]  # (7, C_in, 1, 64)
            a, b = _bn_affine(w, bn)
            self.register_buffer(f"mid_w{i}", torch.from_numpy(np.ascontiguousarray(k[:, :, 0, :].transpose(2, 1, 0))))
            self.register_buffer(f"mid_b{i}", torch.from_numpy(w[f"{conv}/bias"].copy()))
            self.register_buffer(f"mid_a{i}", torch.from_numpy(a.astype(np.float32)))
            self.register_buffer(f"mid_c{i}", torch.from_numpy(b.astype(np.float32)))
        self.backend.load_tf(w)

    # -- forward --------------------------------------------------------------------------------
    def frontend(self, x: Tensor) -> Tensor:
        """(N, T, 96) log-Mel patches -> (N, 561, T) front-end features (channels: f74 204, f77 204,
        s1 51, s2 51, s3 51)."""
        xn = (x * self.in_a + self.in_b)[:, None]  # (N, 1, T, 96)
        outs = []
        for blk in self.blocks:
            full = blk.const[None, :, None].expand(x.shape[0], blk.n_out, x.shape[1]).clone()
            full[:, blk.alive] = blk(xn)
            outs.append(full)
        return torch.cat(outs, 1)

    def midend(self, fe: Tensor) -> Tensor:
        """(N, 561, T) -> (N, 753, T): [front end, bn_conv1, res_conv2, res_conv3]."""
        feats = [fe]
        h = fe
        for i in range(3):
            z = F.conv1d(F.pad(h, (3, 3)), getattr(self, f"mid_w{i}"), getattr(self, f"mid_b{i}"))
            z = torch.relu(z) * getattr(self, f"mid_a{i}")[:, None] + getattr(self, f"mid_c{i}")[:, None]
            h = z if i == 0 else z + h
            feats.append(h)
        return torch.cat(feats, 1)

    def pooled(self, patches: Tensor) -> Tensor:
        """(N, 187, 96) log-Mel patches -> (N, 1506): temporal max and mean of the 753 mid-end
        channels, interleaved per channel (musicnn's flatten of concat([max, mean], 2))."""
        feats = self.midend(self.frontend(patches.float()))
        return torch.stack((feats.amax(2), feats.mean(2)), dim=2).flatten(1)

    def penultimate(self, pooled: Tensor) -> Tensor:
        return self.backend.penultimate(pooled)

    def logits(self, penultimate: Tensor) -> Tensor:
        return self.backend.logits(penultimate)

    def forward(self, patches: Tensor) -> dict:
        pooled = self.pooled(patches)
        pen = self.penultimate(pooled)
        logits = self.logits(pen)
        return {"pooled": pooled, "penultimate": pen, "logits": logits, "taggram": torch.sigmoid(logits)}


def _random_weights(n_tags: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = checkpoint_shapes(n_tags)
    w = {}
    for k, s in shapes.items():
        if k.endswith("moving_variance") or k.endswith("gamma"):
            w[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        else:
            w[k] = (0.05 * rng.standard_normal(s)).astype(np.float32)
    return w


def checkpoint_shapes(n_tags: int = 50) -> dict[str, tuple[int, ...]]:
    """Shapes of musicnn's model variables (the checkpoints also hold Adam slots and beta powers)."""
    shapes: dict[str, tuple[int, ...]] = {}
    bn_sizes = [1, 204, 204, 51, 51, 51, 64, 64, 64, POOLED_DIM, PENULTIMATE_DIM]
    for i, n in enumerate(bn_sizes):
        name = "batch_normalization" + (f"_{i}" if i else "")
        for v in ("beta", "gamma", "moving_mean", "moving_variance"):
            shapes[f"{name}/{v}"] = (n,)
    convs = [
        (7, 38, 1, 204),
        (7, 67, 1, 204),
        (128, 1, 1, 51),
        (64, 1, 1, 51),
        (32, 1, 1, 51),
        (7, N_FRONTEND, 1, 64),
        (7, 64, 1, 64),
        (7, 64, 1, 64),
    ]
    for i, s in enumerate(convs):
        name = "conv2d" + (f"_{i}" if i else "")
        shapes[f"{name}/kernel"] = s
        shapes[f"{name}/bias"] = (s[-1],)
    shapes["dense/kernel"] = (POOLED_DIM, PENULTIMATE_DIM)
    shapes["dense/bias"] = (PENULTIMATE_DIM,)
    shapes["dense_1/kernel"] = (PENULTIMATE_DIM, n_tags)
    shapes["dense_1/bias"] = (n_tags,)
    return shapes


@lru_cache(maxsize=4)
def _cached_model(name: str) -> Musicnn:
    return Musicnn(name)


def clip_features(waveform, name: str = "musicnn_msd") -> dict[str, Tensor]:
    """Convenience: waveform(s) at 16 kHz -> per-song means over the song's patches of
    {"pooled" (B, 1506), "penultimate" (B, 200), "taggram" (B, n_tags)}, plus "patch_taggram"
    (B, P, n_tags) and "mask" (B, P)."""
    model = _cached_model(name)
    with torch.inference_mode():
        p, mask = patches(log_mel(waveform))
        b, n = mask.shape
        out = model(p[mask])
        res = {"mask": mask}
        w = mask.float() / mask.sum(1, keepdim=True)
        for k in ("pooled", "penultimate", "taggram"):
            full = out[k].new_zeros(b, n, out[k].shape[-1])
            full[mask] = out[k]
            if k == "taggram":
                res["patch_taggram"] = full
            res[k] = (full * w[..., None]).sum(1)
    return res

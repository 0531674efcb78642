"""Sequence datasets: the row layout, Moving MNIST, the polyphonic music pickles and the LGSSM samples.

Expected values are computed here independently (plain loops over the documented layout and formats); the music
pickles are written here in the exact on-disk format of the authors' files; Moving MNIST uses the real binarized
MNIST from ``$AMORTLAB_DATA`` (skipped when absent).
"""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from amortlab.data import (LGSSMDataModule, MovingMNISTDataModule, PolyphonicMusicDataModule, SequenceDataModule,
                           TensorDataModule, pack_sequences, unpack_steps)
from amortlab.data.music import FILENAMES
from amortlab.errors import AmortlabError, DatasetNotFoundError
from amortlab.data.lgssm_params import LGSSMParams

REPO = Path(__file__).resolve().parents[1]


# --- the row layout ---------------------------------------------------------------------------------------------------
def expected_rows(seqs: list[np.ndarray], steps: int) -> np.ndarray:
    """The documented layout, element by element."""
    dim = seqs[0].shape[1]
    out = np.zeros((len(seqs), steps * (dim + 1)), dtype=np.float32)
    for i, s in enumerate(seqs):
        for t in range(len(s)):
            for d in range(dim):
                out[i, t * (dim + 1) + d] = s[t, d]
            out[i, t * (dim + 1) + dim] = 1.0
    return out


def test_pack_unpack_round_trip_ragged():
    rng = np.random.default_rng(0)
    lengths, dim, steps = [3, 1, 5, 4], 2, 6
    seqs = [rng.normal(size=(n, dim)).astype(np.float32) for n in lengths]
    seqs[1][:] = 0.0  # an all-zero real step is still present
    rows = pack_sequences(seqs, steps)
    assert rows.dtype == torch.float32 and rows.shape == (4, steps * (dim + 1))
    np.testing.assert_array_equal(rows.numpy(), expected_rows(seqs, steps))
    # tensors are accepted too
    assert torch.equal(pack_sequences([torch.from_numpy(s) for s in seqs], steps), rows)

    values, present = unpack_steps(rows, dim)
    assert values.shape == (4, steps, dim) and present.shape == (4, steps)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        np.testing.assert_array_equal(values[i, :n].numpy(), s)
        assert (values[i, n:] == 0).all()
        assert present[i].tolist() == [1.0] * n + [0.0] * (steps - n)
    # any leading dimensions, and views (no copy)
    v3, p3 = unpack_steps(rows.view(2, 2, -1), dim)
    assert v3.shape == (2, 2, steps, dim) and p3.shape == (2, 2, steps)
    assert torch.equal(v3.reshape(4, steps, dim), values) and torch.equal(p3.reshape(4, steps), present)
    assert values.data_ptr() == rows.data_ptr() and present.untyped_storage().data_ptr() == rows.data_ptr()
    rows[0, 0] = 42.0
    assert values[0, 0, 0] == 42.0


def test_pack_and_unpack_errors():
    ok = np.ones((2, 3))
    with pytest.raises(ValueError, match="steps=2"):
        pack_sequences([ok, np.ones((3, 3))], 2)
    with pytest.raises(ValueError, match="0 steps"):
        pack_sequences([ok, np.ones((0, 3))], 4)
    with pytest.raises(ValueError, match="same step dimension"):
        pack_sequences([ok, np.ones((2, 4))], 4)
    with pytest.raises(ValueError):
        pack_sequences([], 4)
    with pytest.raises(ValueError, match="whole number of steps"):
        unpack_steps(torch.zeros(2, 10), 3)


def test_sequence_datasets_refuse_binarization():
    with pytest.raises(AmortlabError, match="binarization=none") as e:
        LGSSMDataModule(binarization="static")
    assert "\n" not in str(e.value)
    assert LGSSMDataModule().binarization == "none" and LGSSMDataModule.is_sequence
    assert issubclass(LGSSMDataModule, SequenceDataModule) and issubclass(SequenceDataModule, TensorDataModule)


# --- configs ----------------------------------------------------------------------------------------------------------
CONFIGS = {"moving_mnist": MovingMNISTDataModule, "lgssm": LGSSMDataModule,
           **{c: PolyphonicMusicDataModule for c in FILENAMES}}
COMMON = {"_target_", "data_dir", "seed", "batch_size", "eval_batch_size", "binarization", "download",
          "verify_checksum", "max_epochs", "train_subset"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sequence_config_instantiates(name, tmp_path):
    import inspect

    from hydra.utils import instantiate

    cfg = OmegaConf.create({"data_dir": str(tmp_path), "seed": 7,
                            "dataset": OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")})
    assert COMMON <= set(cfg.dataset) and cfg.dataset.binarization == "none"
    args = set()
    for c in CONFIGS[name].__mro__:
        if issubclass(c, TensorDataModule) and "__init__" in vars(c):
            args |= set(inspect.signature(c.__init__).parameters) - {"self", "kwargs"}
    assert set(cfg.dataset) - {"_target_"} <= args, set(cfg.dataset) - args
    dm = instantiate(cfg.dataset)  # lazy: reads and generates nothing yet
    assert type(dm) is CONFIGS[name] and dm.name == name and dm.splits is None
    assert dm.data_dir == str(tmp_path) and dm.seed == 7 and dm.max_epochs > 0
    with pytest.raises(Exception, match="batchsize"):
        instantiate(OmegaConf.merge(cfg.dataset, {"batchsize": 5}))


# --- Moving MNIST -----------------------------------------------------------------------------------------------------
def small_mm(data_dir: Path, **kw) -> MovingMNISTDataModule:
    args = dict(data_dir=str(data_dir), n_train=12, n_val=6, n_test=6, steps=8)
    args.update(kw)
    dm = MovingMNISTDataModule(**args)
    dm.setup()
    return dm


def bbox(img: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def crop(img: np.ndarray) -> np.ndarray:
    r0, r1, c0, c1 = bbox(img)
    return img[r0:r1, c0:c1]


def source(mnist_dir: Path) -> dict[str, np.ndarray]:
    with np.load(mnist_dir / "binarized_mnist.npz") as z:
        return {"train": z["train"].reshape(-1, 28, 28), "val": z["valid"].reshape(-1, 28, 28),
                "test": z["test"].reshape(-1, 28, 28)}


def test_moving_mnist_deterministic_and_binary(mnist_dir):
    a, b = small_mm(mnist_dir), small_mm(mnist_dir)
    c = small_mm(mnist_dir, generation_seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split], b.splits[split])
        assert not torch.equal(a.splits[split], c.splits[split])
    assert a.x_dim == 8 * (32 * 32 + 1) and a.image_shape == (1, 8, 1025) and a.step_dim == 1024
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    values, present = unpack_steps(a.splits["train"], a.step_dim)
    assert (present == 1).all() and set(values.unique().tolist()) == {0.0, 1.0}
    frames = a.frames(a.splits["train"])
    assert frames.shape == (12, 8, 32, 32)
    # C-ordered frames: frame t of row i is values i, t*(1024+1) .. +1024 reshaped row-major
    np.testing.assert_array_equal(frames[3, 2].numpy(), a.splits["train"][3, 2 * 1025:2 * 1025 + 1024].reshape(32, 32))
    info = a.info()
    assert info["steps"] == 8 and info["step_dim"] == 1024
    assert (info["train_steps"], info["val_steps"], info["test_steps"]) == (96, 48, 48)


@pytest.mark.parametrize("digit_size", [28, 14])
def test_moving_mnist_one_digit_whole_and_bouncing(mnist_dir, digit_size):
    src = source(mnist_dir)
    canvas, steps = (32, 24) if digit_size == 28 else (20, 24)
    dm = small_mm(mnist_dir, n_digits=1, canvas=canvas, digit_size=digit_size, steps=steps)
    limit = canvas - digit_size
    bounced = 0
    for split in ("train", "val", "test"):
        frames = dm.frames(dm.splits[split]).numpy().astype(np.uint8)
        for i, seq in enumerate(frames):
            digit = src[split][dm.trajectories[split]["digit"][i, 0]]
            if digit_size == 14:  # 2x2 max-pool, written out
                digit = digit[0::2, 0::2] | digit[1::2, 0::2] | digit[0::2, 1::2] | digit[1::2, 1::2]
            r0, _, c0, _ = bbox(digit)
            pos = []
            for frame in seq:
                assert frame.sum() == digit.sum()  # the whole digit, never clipped
                fr0, _, fc0, _ = bbox(frame)
                p = (fr0 - r0, fc0 - c0)  # the digit's corner, from the bounding boxes
                assert 0 <= p[0] <= limit and 0 <= p[1] <= limit
                placed = np.zeros_like(frame)
                placed[p[0]:p[0] + digit_size, p[1]:p[1] + digit_size] = digit
                np.testing.assert_array_equal(frame, placed)
                pos.append(p)
            pos = np.array(pos)
            np.testing.assert_array_equal(pos, dm.trajectories[split]["position"][i, :, 0])
            # the bounces, as a closed form: motion in a box = the free motion folded back, a triangle wave
            traj = dm.trajectories[split]
            assert 1 <= np.linalg.norm(traj["velocity"][i, 0]) <= 3  # speed uniform in [1, 3] px/frame
            np.testing.assert_array_equal(traj["start"][i, 0], pos[0])  # integer start corner
            free = traj["start"][i, 0] + np.arange(steps)[:, None] * traj["velocity"][i, 0]
            folded = limit - np.abs(np.mod(free, 2 * limit) - limit)
            assert np.abs(np.rint(folded) - pos).max() <= 1 and (np.rint(folded) == pos).mean() > 0.95
            step = np.diff(pos, axis=0)
            assert np.abs(step).max() <= 4  # speed <= 3 px/frame, plus rounding
            # a bounce: the direction of a coordinate reverses (seen as a sign change of its moves)
            signs = np.sign(step)
            bounced += int(any((signs[:-1, k] * signs[1:, k] < 0).any() for k in range(2)))
    assert bounced > 0


def test_moving_mnist_two_digits_combine_by_max(mnist_dir):
    src = source(mnist_dir)
    dm = small_mm(mnist_dir, n_digits=2, digit_size=28)
    frames = dm.frames(dm.splits["val"]).numpy()
    traj = dm.trajectories["val"]
    for i in range(len(frames)):
        for t in range(frames.shape[1]):
            want = np.zeros((32, 32), dtype=np.uint8)
            for k in range(2):
                r, c = traj["position"][i, t, k]
                want[r:r + 28, c:c + 28] = np.maximum(want[r:r + 28, c:c + 28], src["val"][traj["digit"][i, k]])
            np.testing.assert_array_equal(frames[i, t], want)


def test_moving_mnist_digits_come_from_the_matching_split(mnist_dir):
    src = source(mnist_dir)
    dm = small_mm(mnist_dir, n_digits=1, digit_size=28)
    for split in ("val", "test"):
        first = crop(dm.frames(dm.splits[split])[0, 0].numpy().astype(np.uint8))
        sums = src[split].reshape(len(src[split]), -1).sum(1)
        matches = [j for j in np.flatnonzero(sums == first.sum())
                   if crop(src[split][j]).shape == first.shape and (crop(src[split][j]) == first).all()]
        assert matches, f"the first {split} frame is not a digit of binarized MNIST's {split} split"


def test_moving_mnist_needs_binarized_mnist(tmp_path):
    dm = MovingMNISTDataModule(data_dir=str(tmp_path), n_train=2, n_val=2, n_test=2)
    with pytest.raises(DatasetNotFoundError, match="binarized_mnist"):
        dm.setup()
    with pytest.raises(AmortlabError, match="digit_size"):
        MovingMNISTDataModule(digit_size=20)
    with pytest.raises(AmortlabError, match="canvas"):
        MovingMNISTDataModule(canvas=10)


def study_datasets(name: str, tmp_path: Path) -> list:
    """The ``dataset`` node of every setting of study ``name``, composed exactly as ``sweep.py`` composes its runs:
    the setting files it writes, Hydra's compose with ``+setting=<id>``, the study's base overrides, a seed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from amortlab.studies.expand import expand, write_setting_files
    from amortlab.studies.overrides import merge_overrides, searchpath
    from amortlab.studies.spec import CONF, load_study

    study = load_study(name)
    settings = expand(study)
    write_setting_files(settings, tmp_path, study["name"])
    run_overrides = merge_overrides(study["base"], [f"group={study['name']}"])
    out = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for s in settings:
                cfg = compose("config", overrides=[searchpath(tmp_path), f"+setting={s.id}", *run_overrides,
                                                   f"seed={study['seeds'][0]}"])
                out.append(cfg.dataset)
    finally:
        GlobalHydra.instance().clear()
    return out


def runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    return list(zip(edges[0::2], edges[1::2]))


def test_avf_study_runs_on_two_14px_digits_moving_across_the_canvas(mnist_dir, tmp_path):
    """The AVF study (conf/sweep/avf_reduced.yaml) states two 14x14 digits on a 32x32 canvas: each setting composes
    to that dataset, and the frames it generates show it. Digit size, from the frames alone: where the support
    splits into two separate column (row) runs, each run -- one digit -- is at most 14 px wide (tall); exactly: every
    on-pixel lies in one of the two 14 x 14 boxes at the corners the generator records. Motion: the
    leftmost (topmost) occupied pixel ranges over most of the 32 - 14 = 18 px of travel, and the recorded corners
    span [0, 18]."""
    from hydra.utils import instantiate

    nodes = study_datasets("avf_reduced", tmp_path)
    assert len(nodes) == 4 and all(n == nodes[0] for n in nodes)
    node = nodes[0]
    assert (node.canvas, node.digit_size, node.n_digits) == (32, 14, 2)
    dm = instantiate(node, data_dir=str(mnist_dir))
    dm.setup()
    frames = dm.frames(dm.splits["train"]).numpy().astype(bool)  # [5000, 10, 32, 32]
    assert frames.shape == (5000, 10, 32, 32)
    flat = frames.reshape(-1, 32, 32)

    widths = {0: [], 1: []}  # per axis: the extent of each digit in frames where the two digits are apart
    lead = {0: [], 1: []}    # per axis: the first occupied row / column of every frame
    for f in flat[::5]:
        for axis in (0, 1):
            occupied = f.any(axis=1 - axis)
            r = runs(occupied)
            lead[axis].append(r[0][0])
            if len(r) == 2:
                widths[axis] += [e - s for s, e in r]
    for axis in (0, 1):
        assert len(widths[axis]) > 0.1 * len(flat[::5]), axis  # apart in a good share of frames
        # (a run can also be a digit plus a stray piece of the other one: the 99th percentile, not the max)
        assert np.percentile(widths[axis], 99) <= 14 and np.median(widths[axis]) >= 7, axis
        assert max(lead[axis]) - min(lead[axis]) >= 0.75 * (32 - 14), (axis, min(lead[axis]), max(lead[axis]))

    pos = dm.trajectories["train"]["position"]  # [N, T, 2, 2] corners (row, column)
    assert pos.min() == 0 and pos.max() == 18
    for axis in (0, 1):
        assert np.percentile(pos[..., axis], 95) - np.percentile(pos[..., axis], 5) >= 0.75 * 18
    boxes = np.zeros_like(frames)
    n, t = np.meshgrid(np.arange(frames.shape[0]), np.arange(frames.shape[1]), indexing="ij")
    offs = np.arange(14)
    for k in range(2):
        rows = pos[:, :, k, 0][..., None, None] + offs[:, None]
        cols = pos[:, :, k, 1][..., None, None] + offs[None, :]
        boxes[n[..., None, None], t[..., None, None], rows, cols] = True
        inside = frames[n[..., None, None], t[..., None, None], rows, cols]
        assert inside.reshape(*inside.shape[:2], -1).any(-1).all()  # each digit is there, in its box
    assert not (frames & ~boxes).any()  # nothing outside the two 14 x 14 boxes


# --- polyphonic music -------------------------------------------------------------------------------------------------
def py2_pickle(obj) -> bytes:
    """``obj`` (dict / list / tuple / str / small int) pickled as Python 2's cPickle writes protocol 2: byte strings
    (SHORT_BINSTRING), not the unicode strings Python 3 writes."""
    def enc(o) -> bytes:
        if isinstance(o, bool) or not isinstance(o, (dict, list, tuple, str, int)):
            raise TypeError(o)
        if isinstance(o, str):
            b = o.encode("latin1")
            return b"U" + bytes([len(b)]) + b
        if isinstance(o, int):
            return b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o)
        if isinstance(o, tuple):
            return b"(" + b"".join(map(enc, o)) + b"t"
        if isinstance(o, list):
            return b"]" + (b"(" + b"".join(map(enc, o)) + b"e" if o else b"")
        return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
    return b"\x80\x02" + enc(obj) + b"."


SONGS = {
    "train": [[(60, 64, 67), (60,), (), (21, 108)], [(62, 65), (62, 65, 69), (71,)]],
    "valid": [[(48,), (50, 55), (52,), (53, 57), (55,), (57,), (59, 62), (60,)]],  # the longest: 8 steps
    "test": [[(70, 74)], [(), (72,), (72, 76, 79)]],
}


def roll(seq) -> np.ndarray:
    out = np.zeros((len(seq), 88), dtype=np.float32)
    for t, notes in enumerate(seq):
        for n in notes:
            out[t, n - 21] = 1.0
    return out


def write_music(d: Path, corpus: str = "jsb_chorales", data=None, py2: bool = False) -> Path:
    path = d / FILENAMES[corpus]
    data = SONGS if data is None else data
    path.write_bytes(py2_pickle(data) if py2 else pickle.dumps(data, protocol=2))
    return path


@pytest.mark.parametrize("py2", [False, True])
def test_music_piano_rolls_and_padding(tmp_path, py2):
    write_music(tmp_path, "nottingham", py2=py2)
    dm = PolyphonicMusicDataModule(corpus="nottingham", data_dir=str(tmp_path))
    dm.setup()
    assert dm.name == "nottingham" and dm.steps == 8 and dm.step_dim == 88 and dm.x_dim == 8 * 89
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        x = dm.splits[split]
        assert x.shape == (len(SONGS[key]), 8 * 89)
        for i, seq in enumerate(SONGS[key]):
            blocks = x[i].view(8, 89).numpy()
            np.testing.assert_array_equal(blocks[:len(seq), :88], roll(seq))
            assert blocks[:len(seq), 88].tolist() == [1.0] * len(seq)
            assert (blocks[len(seq):] == 0).all()  # padding: zeros and flag 0
    info = dm.info()
    assert (info["train_steps"], info["val_steps"], info["test_steps"]) == (7, 8, 4)
    assert info["corpus"] == "nottingham" and info["max_steps"] is None and info["train_pieces"] == 2


def test_music_max_steps_chunks(tmp_path):
    write_music(tmp_path)
    dm = PolyphonicMusicDataModule(corpus="jsb_chorales", data_dir=str(tmp_path), max_steps=3)
    assert dm.x_dim == 3 * 89  # known before reading
    dm.setup()
    values, present = unpack_steps(dm.splits["val"], 88)
    assert values.shape == (3, 3, 88)  # 8 steps -> chunks of 3, 3, 2
    full = roll(SONGS["valid"][0])
    assert present.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    np.testing.assert_array_equal(values[:, :3].reshape(9, 88)[:8].numpy(), full)
    assert (values[2, 2] == 0).all()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["test"]) == 2  # train 4 -> 3+1, 3 -> 3; test 1, 3
    assert dm.info()["train_steps"] == 7


def test_music_missing_file_names_file_and_url(tmp_path):
    dm = PolyphonicMusicDataModule(corpus="jsb_chorales", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        dm.setup()
    msg = str(e.value)
    assert "JSB Chorales.pickle" in msg and "http://www-etud.iro.umontreal.ca/~boulanni/JSB%20Chorales.pickle" in msg
    with pytest.raises(AmortlabError, match="jsb_chorales, piano_midi, musedata, nottingham"):
        PolyphonicMusicDataModule(corpus="bach")


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_music_pickle_with_a_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "executed"
    data = {"train": [[(60,)]], "valid": [[(60,)]], "test": [[Exploit(marker)]]}
    path = tmp_path / FILENAMES["musedata"]
    path.write_bytes(pickle.dumps(data, protocol=2))
    dm = PolyphonicMusicDataModule(corpus="musedata", data_dir=str(tmp_path))
    with pytest.raises(AmortlabError, match="forbidden") as e:
        dm.setup()
    assert not marker.exists()
    assert "MuseData.pickle" in str(e.value) and "download it again" in str(e.value)


@pytest.mark.parametrize("bad, match", [
    ({"train": [[(20,)]], "valid": [[(60,)]], "test": [[(60,)]]}, "MIDI note 20"),
    ({"train": [[(60,)]], "valid": [[(109,)]], "test": [[(60,)]]}, "MIDI note 109"),
    ({"train": [[(60,)]], "valid": [[(60,)]]}, "lacks the keys"),
    ({"train": [[(60.5,)]], "valid": [[(60,)]], "test": [[(60,)]]}, "not an int"),
    ({"train": [[60]], "valid": [[(60,)]], "test": [[(60,)]]}, "not a list of MIDI note numbers"),
    ({"train": [[]], "valid": [[(60,)]], "test": [[(60,)]]}, "empty"),
    ([1, 2, 3], "not a dict"),
])
def test_music_bad_contents(tmp_path, bad, match):
    path = write_music(tmp_path, "piano_midi", data=bad)
    dm = PolyphonicMusicDataModule(corpus="piano_midi", data_dir=str(tmp_path))
    with pytest.raises(AmortlabError, match=match) as e:
        dm.setup()
    msg = str(e.value)
    assert str(path) in msg and "21..108" in msg and "Piano-midi.de.pickle" in msg and "\n" not in msg


def test_music_truncated_file(tmp_path):
    path = write_music(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(AmortlabError, match="cannot unpickle"):
        PolyphonicMusicDataModule(data_dir=str(tmp_path)).setup()


# --- LGSSM ------------------------------------------------------------------------------------------------------------
def stationary_cov(p: LGSSMParams) -> np.ndarray:
    """Cov(x_t) for large t: P = A P A' + Q by iteration, then C P C' + R."""
    A, C = p.A.numpy(), p.C.numpy()
    Q, R = np.diag(p.q.numpy() ** 2), np.diag(p.r.numpy() ** 2)
    P = np.zeros_like(A)
    for _ in range(2000):
        P = A @ P @ A.T + Q
    return C @ P @ C.T + R


def test_lgssm_shapes_determinism_info():
    dm = LGSSMDataModule(z_dim=3, x_dim=5, steps=7, n_train=30, n_val=10, n_test=20, rho=0.8, data_seed=4)
    ref = LGSSMParams.make(3, 5, seed=0, rho=0.8, angle=0.3, q_std=0.3, r_std=0.5)
    assert all(torch.equal(getattr(dm.params, k), getattr(ref, k)) for k in ("A", "C", "q", "r", "mu0", "s0"))
    dm.setup()
    assert dm.x_dim == 7 * 6 and dm.step_dim == 5 and dm.steps == 7
    assert [tuple(dm.splits[s].shape) for s in ("train", "val", "test")] == [(30, 42), (10, 42), (20, 42)]
    values, present = unpack_steps(dm.splits["train"], 5)
    assert (present == 1).all() and dm.splits["train"].dtype == torch.float32
    x, _ = ref.sample(30, 7, torch.Generator().manual_seed(3 * 4 + 0))  # the documented seeding
    torch.testing.assert_close(values, x.float())
    again = LGSSMDataModule(z_dim=3, x_dim=5, steps=7, n_train=30, n_val=10, n_test=20, rho=0.8, data_seed=4)
    again.setup()
    other = LGSSMDataModule(z_dim=3, x_dim=5, steps=7, n_train=30, n_val=10, n_test=20, rho=0.8, data_seed=5)
    other.setup()
    for s in ("train", "val", "test"):
        assert torch.equal(dm.splits[s], again.splits[s]) and not torch.equal(dm.splits[s], other.splits[s])
    assert not torch.equal(dm.splits["val"], dm.splits["test"][:10])
    info = dm.info()
    assert info["lgssm"] == {"z_dim": 3, "x_dim": 5, "param_seed": 0, "rho": 0.8, "angle": 0.3, "q_std": 0.3,
                             "r_std": 0.5, "data_seed": 4}
    assert info["train_steps"] == 30 * 7 and info["steps"] == 7


def test_lgssm_stationary_covariance(one_thread):
    n, steps = 4000, 80
    dm = LGSSMDataModule(steps=steps, n_train=n, n_val=1, n_test=1)
    dm.setup()
    values, _ = unpack_steps(dm.splits["train"], 4)
    x = values[:, -1].double().numpy()  # x_T: rho^(2T) ~ 3e-4 of the start's covariance is left
    want = stationary_cov(dm.params)
    got = np.cov(x, rowvar=False)
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want ** 2) / n)  # standard error of each entry
    assert np.all(np.abs(got - want) < 5 * se), (got, want)
    assert np.all(np.abs(x.mean(0)) < 5 * np.sqrt(np.diag(want) / n))
    # the check has power: it rejects the covariance without the observation noise (C P C', off by r^2 = 0.25)
    assert not np.all(np.abs(got - (want - 0.25 * np.eye(4))) < 5 * se)

"""The four polyphonic music benchmarks of Boulanger-Lewandowski, Bengio & Vincent (ICML 2012) as binary piano rolls.

``corpus`` is one of ``jsb_chorales``, ``piano_midi``, ``musedata``, ``nottingham`` (``conf/dataset/<corpus>.yaml``);
the datamodule's name is the corpus. Each reads one file from ``data_dir``, the authors' own:

    "JSB Chorales.pickle", "Piano-midi.de.pickle", "MuseData.pickle", "Nottingham.pickle"
    from http://www-etud.iro.umontreal.ca/~boulanni/ (the space URL-encoded as %20)

Each is a (Python 2) pickle of a dict with keys ``train``, ``valid``, ``test``; each a list of sequences, each
sequence a list of time steps, each time step a list/tuple of the MIDI note numbers sounding then, in 21..108 (the 88
piano keys; an empty step is silence). A step becomes a binary vector of 88 values (note n -> index n - 21), so
``step_dim = 88``; ``valid`` becomes the datamodule's ``val``.

The file is read with a restricted unpickler that refuses every global (class or function reference), so a tampered
file cannot run code; a file that is not plain lists/tuples of ints in that structure is refused with an error naming
the file, the expected format and the URL to download it again. The authors publish no checksum, and no canonical
sha256 of these files could be found, so only their presence is checked (``verify_checksum`` has nothing to verify;
the structure and note checks above catch damaged files). The original host may be unreachable; copies of the same
files are kept by web archives.

``max_steps`` (default null) decides the sequence length ``steps``:

- null: every sequence is padded to the longest sequence over all three splits (the usual evaluation: whole pieces).
- an integer: every sequence is cut into consecutive chunks of at most ``max_steps`` steps (the last chunk of a piece
  may be shorter and is padded), and ``steps = max_steps``. This changes what is evaluated: each chunk is a separate
  sequence that starts without the context of the previous chunk, so numbers are not comparable with whole-piece ones.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from torch import Tensor

from amortlab.data.download import Resource, fetch
from amortlab.data.sequence import SequenceDataModule, pack_sequences
from amortlab.errors import AmortlabError

BASE_URL = "http://www-etud.iro.umontreal.ca/~boulanni/"
FILENAMES = {"jsb_chorales": "JSB Chorales.pickle", "piano_midi": "Piano-midi.de.pickle",
             "musedata": "MuseData.pickle", "nottingham": "Nottingham.pickle"}
# sha256=None: no canonical checksum is published for these files (presence-only check, as for the .amat files).
RESOURCES = {c: Resource(f, BASE_URL + quote(f), None) for c, f in FILENAMES.items()}
SOURCE_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # datamodule split -> key in the pickle
LOWEST, HIGHEST = 21, 108  # MIDI notes of the 88 piano keys (A0..C8)
KEYS = HIGHEST - LOWEST + 1
FORMAT = ("a pickled dict with keys 'train', 'valid', 'test', each a list of sequences, each sequence a non-empty "
          "list of time steps, each time step a list or tuple of MIDI note numbers (ints in 21..108)")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads only plain containers and scalars: every global (class, function) is refused, so nothing can run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def restricted_load(path: Path) -> Any:
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


class PolyphonicMusicDataModule(SequenceDataModule):
    def __init__(self, corpus: str = "jsb_chorales", max_steps: int | None = None, **kwargs: Any):
        if corpus not in FILENAMES:
            raise AmortlabError(f"dataset.corpus={corpus!r} is not one of the polyphonic music corpora "
                                f"{', '.join(FILENAMES)}; pick one of those (e.g. dataset=jsb_chorales).")
        self.name = corpus
        super().__init__(**kwargs)
        self.corpus = corpus
        self.resource = RESOURCES[corpus]
        if max_steps is not None and int(max_steps) < 1:
            raise AmortlabError(f"dataset.max_steps={max_steps} must be a positive integer, or null to pad every "
                                f"sequence to the longest one.")
        self.max_steps = None if max_steps is None else int(max_steps)
        self.num_pieces: dict[str, int] = {}
        self.step_dim = KEYS
        if self.max_steps is not None:
            self.set_layout(self.max_steps, KEYS)

    # --- reading ------------------------------------------------------------------------------------------------
    def format_error(self, path: Path, problem: str) -> AmortlabError:
        return AmortlabError(f"Dataset '{self.name}': {path} is not a polyphonic music file in the expected format "
                             f"({problem}); expected {FORMAT}. The file is damaged or a different file: delete it "
                             f"and download it again from {self.resource.url}.")

    def read(self, path: Path) -> dict[str, list[np.ndarray]]:
        """``{"train", "val", "test"}`` lists of binary piano rolls ``[T_i, 88]`` (uint8) from the pickle."""
        try:
            data = restricted_load(path)
        except pickle.UnpicklingError as e:
            raise self.format_error(path, f"unpickling refused or failed: {e}") from None
        except Exception as e:  # EOFError, ValueError, UnicodeDecodeError...: a truncated or foreign file
            raise self.format_error(path, f"cannot unpickle it: {type(e).__name__}: {e}") from None
        if not isinstance(data, dict):
            raise self.format_error(path, f"it holds a {type(data).__name__}, not a dict")
        missing = [k for k in SOURCE_SPLITS.values() if k not in data]
        if missing:
            raise self.format_error(path, f"the dict lacks the keys {missing}; it has {sorted(map(str, data))}")
        return {split: [self.piano_roll(seq, path, f"{key}[{i}]") for i, seq in enumerate(self.sequences(data[key],
                                                                                                           path, key))]
                for split, key in SOURCE_SPLITS.items()}

    def sequences(self, seqs: Any, path: Path, key: str) -> list:
        if not isinstance(seqs, (list, tuple)) or not seqs:
            raise self.format_error(path, f"'{key}' is a {type(seqs).__name__}"
                                    + (" of no sequences" if isinstance(seqs, (list, tuple)) else "")
                                    + ", not a non-empty list of sequences")
        return list(seqs)

    def piano_roll(self, seq: Any, path: Path, where: str) -> np.ndarray:
        if not isinstance(seq, (list, tuple)) or not seq:
            raise self.format_error(path, f"sequence {where} is "
                                    + ("empty" if isinstance(seq, (list, tuple)) else f"a {type(seq).__name__}")
                                    + ", not a non-empty list of time steps")
        roll = np.zeros((len(seq), KEYS), dtype=np.uint8)
        for t, step in enumerate(seq):
            if not isinstance(step, (list, tuple)):
                raise self.format_error(path, f"time step {where}[{t}] is a {type(step).__name__}, not a list of "
                                        f"MIDI note numbers")
            for note in step:
                if isinstance(note, bool) or not isinstance(note, int):
                    raise self.format_error(path, f"time step {where}[{t}] holds {note!r}, not an int MIDI note")
                if not LOWEST <= note <= HIGHEST:
                    raise self.format_error(path, f"time step {where}[{t}] holds MIDI note {note}, outside the piano "
                                            f"range {LOWEST}..{HIGHEST}")
                roll[t, note - LOWEST] = 1
        return roll

    # --- datamodule ---------------------------------------------------------------------------------------------
    def chunks(self, roll: np.ndarray) -> list[np.ndarray]:
        if self.max_steps is None:
            return [roll]
        return [roll[i:i + self.max_steps] for i in range(0, len(roll), self.max_steps)]

    def load_splits(self) -> dict[str, Tensor]:
        path = fetch(self.resource, self.data_dir, self.name, self.download, self.verify_checksum)
        rolls = self.read(path)
        self.num_pieces = {split: len(r) for split, r in rolls.items()}
        seqs = {split: [c for roll in r for c in self.chunks(roll)] for split, r in rolls.items()}
        if self.max_steps is None:
            self.set_layout(max(len(s) for split in seqs.values() for s in split), KEYS)
        return {split: pack_sequences(s, self.steps) for split, s in seqs.items()}

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(corpus=self.corpus, max_steps=self.max_steps,
                   **{f"{split}_pieces": n for split, n in self.num_pieces.items()})
        return out

"""What `tuneline init DIR --data PATH` was given: the `data:` section that reads it, from a look at a sample.

recognise_data() looks, it does not load: a folder is walked breadth first for a few hundred names (a bounded
number from each folder, so that class folders beyond the first are seen), an archive is read once as a stream
for its first few hundred members (tasks/data/archive.py), a text file for its header, and a few dozen clips'
headers give the sample rate. A URL is not read at all (`fetch` reads it where it lies): it is taken for an
image folder, as `tuneline init` always took one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter, deque
from pathlib import Path, PurePosixPath
from typing import Any

from tuneline.core.config.base import ConfigError
from tuneline.tasks.data.archive import ARCHIVE_SUFFIXES, SPLIT_NAMES, is_archive, members
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.remote import is_url

SAMPLE_FILES = 400        # names looked at, in all
READ_PER_FOLDER = 2000    # directory entries read from any one folder (a flat folder may hold millions)
SAMPLE_PER_FOLDER = 64    # names kept from one folder, spread over its sorted entries
SAMPLE_CLIPS = 24         # clips whose header gives the sample rate
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")   # tasks/data/imagefolder.py reads these
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")   # core/audio.py decodes these
TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl")
TEXT_SPLITS = ("train", "val", "dev", "test")
LABEL_COLUMNS = ("label", "labels", "class", "target", "sentiment")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "comment", "body", "document", "tweet")  # when several
FSDD_PATTERN = "{label}_{speaker}_{index}"
ACCEPTED = ("MNIST's four .gz files; class folders of PNG/JPEG images; WAV/FLAC/OGG clips in class folders or "
            "named like {label}_{speaker}_{index}; a TSV/CSV/JSONL file or a folder of train.*/dev.*/test.* ones; "
            f"or a {'/'.join(ARCHIVE_SUFFIXES)} of images or clips")


def recognise_data(path: str | os.PathLike) -> dict[str, Any]:
    """The `data:` section for what `path` holds (its path key is `path` as given); a one-line ConfigError naming
    what was found and what is accepted when it is none of the data sets init knows."""
    where = str(path)
    if is_url(where):
        return {"source": "imagefolder", "image_folder": where}
    local = Path(where)
    if not local.exists():
        raise ConfigError(f"--data {where}: not found: give the data set's folder or archive (or its URL)")
    try:
        if local.is_dir():
            return _folder(where, local)
        if local.name.lower().endswith(TEXT_SUFFIXES):
            return _text(where, [local], folder=False)
        if is_archive(where):
            return _archive(where)
    except DataError as exc:  # an unreadable archive, an unsafe member name
        raise ConfigError(f"--data {exc}") from None
    raise ConfigError(f"--data {where}: a file init does not read; accepted: {ACCEPTED}")


# --- folders and archives ------------------------------------------------------------------------------------------


def _folder(where: str, root: Path) -> dict[str, Any]:
    from tuneline.tasks.data.fetch import MNIST_SHA256

    mnist = [f"{name}.gz" for name in MNIST_SHA256]
    if present := [name for name in mnist if (root / name).is_file()]:
        if len(present) < len(mnist):
            missing = ", ".join(name for name in mnist if name not in present)
            raise ConfigError(f"--data {where}: MNIST files, but {missing} missing: the folder needs all four")
        return {"source": "mnist", "mirror": where}
    with os.scandir(root) as scan:  # a flat folder may hold millions: its first entries are enough here
        top = [entry.name for _, entry in zip(range(READ_PER_FOLDER), scan) if entry.is_file()]
    splits = sorted((name for name in top if _text_split(name)), key=lambda name: TEXT_SPLITS.index(_text_split(name)))
    if splits:
        return _text(where, [root / name for name in splits], folder=True)
    names = _sample_folder(root)

    def rates() -> Counter:
        clips = [name for name in names if name.lower().endswith(AUDIO_SUFFIXES)][:SAMPLE_CLIPS]
        return Counter(rate for name in clips if (rate := _rate(root.joinpath(*name.split("/")))) is not None)

    return _tree(where, names, rates)


def _text_split(name: str) -> str | None:
    stem, dot, _ = name.partition(".")
    split = stem.lower()
    return split if dot and split in TEXT_SPLITS and name.lower().endswith(TEXT_SUFFIXES) else None


def _sample_folder(root: Path) -> list[str]:
    """Up to SAMPLE_FILES '/'-joined file paths below `root`, breadth first, hidden entries left out."""
    names: list[str] = []
    queue: deque[tuple[str, Path]] = deque([("", root)])
    while queue and len(names) < SAMPLE_FILES:
        prefix, folder = queue.popleft()
        files: list[str] = []
        try:
            with os.scandir(folder) as scan:
                for count, entry in enumerate(scan):
                    if count >= READ_PER_FOLDER:
                        break
                    if entry.name.startswith(".") or entry.name == "__MACOSX":
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        queue.append((f"{prefix}{entry.name}/", Path(entry.path)))
                    elif entry.is_file():
                        files.append(entry.name)
        except OSError:  # an unreadable folder: what the others hold decides
            continue
        files.sort()
        step = max(1, len(files) / SAMPLE_PER_FOLDER)  # spread: a flat folder sorted by label shows several labels
        picked = [files[int(i * step)] for i in range(min(len(files), SAMPLE_PER_FOLDER))]
        names.extend(prefix + name for name in picked[:SAMPLE_FILES - len(names)])
    return names


def _archive(where: str) -> dict[str, Any]:
    names: list[str] = []
    rates: Counter = Counter()
    clips = 0

    def want(_: int, name: str) -> bool:
        nonlocal clips
        if name.lower().endswith(AUDIO_SUFFIXES) and clips < SAMPLE_CLIPS:
            clips += 1
            return True
        return False

    for _, name, is_dir, data in members(where, want):  # one streamed pass, left after SAMPLE_FILES files
        if is_dir:
            continue
        names.append(name)
        if data is not None and (rate := _rate(io.BytesIO(data))) is not None:
            rates[rate] += 1
        if len(names) >= SAMPLE_FILES:
            break
    return _tree(where, names, lambda: rates)


def _rate(clip) -> int | None:
    import soundfile

    try:
        return int(soundfile.info(clip).samplerate)
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError, EOFError, OSError):
        return None  # a broken clip: the others decide; fetch names it


def _tree(where: str, names: list[str], rates) -> dict[str, Any]:
    """imagefolder or audio from a sample of '/'-joined file names below the root; `rates()`: the clips' rates."""
    clips = [PurePosixPath(name) for name in names if name.lower().endswith(AUDIO_SUFFIXES)]
    images = [PurePosixPath(name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    if clips and len(clips) >= len(images):
        found = rates()
        if not found:
            raise ConfigError(f"--data {where}: {len(clips)} audio files, none readable (e.g. {clips[0]}): "
                              "check they are WAV, FLAC or OGG clips")
        data: dict[str, Any] = {"source": "audio", "audio_folder": where, "sample_rate": found.most_common(1)[0][0]}
        folders = {clip.parent.name for clip in clips if clip.parent.name and clip.parent.name not in SPLIT_NAMES}
        pattern = _label_pattern([clip.stem for clip in clips])
        if pattern is not None and len(folders) < 2:  # one folder at most: it only wraps the clips
            data["label_pattern"] = pattern
        elif not folders:
            raise ConfigError(f"--data {where}: {len(clips)} audio clips (e.g. {clips[0]}) but nothing labels them: "
                              "put them in class folders, or name them {label}_..., or init with --example speech "
                              "and set data.label_pattern or data.labels_file")
        return data
    if images:
        if all(len(image.parts) < 2 for image in images):
            raise ConfigError(f"--data {where}: {len(images)} images (e.g. {images[0]}) but no class folders: put "
                              "each class's images in a folder named after it")
        return {"source": "imagefolder", "image_folder": where}
    archives = [name for name in names if is_archive(name)]
    hint = f" (to use the archive, give it: --data {where.rstrip('/')}/{archives[0]})" if archives else ""
    raise ConfigError(f"--data {where}: found {_summary(names)}{hint}; init recognises {ACCEPTED}")


def _label_pattern(stems: list[str]) -> str | None:
    """'{label}_{f1}_…' when every stem has the same number (2 to 6) of '_'-separated fields and the first
    repeats (a label, not an id); FSDD's digits_word_digits is '{label}_{speaker}_{index}'."""
    fields = [stem.split("_") for stem in stems]
    count = len(fields[0])
    if not 2 <= count <= 6 or any(len(parts) != count or not all(parts) for parts in fields):
        return None
    if len({parts[0] for parts in fields}) > max(1, len(stems) // 2):
        return None
    columns = list(zip(*fields))
    if count == 3 and all(value.isdigit() for value in columns[0] + columns[2]) \
            and not any(value.isdigit() for value in columns[1]):
        return FSDD_PATTERN
    return "_".join(["{label}", *(f"{{f{i}}}" for i in range(1, count))])


def _summary(names: list[str]) -> str:
    if not names:
        return "no files"
    kinds = Counter(PurePosixPath(name).suffix.lower() or "(no suffix)" for name in names)
    shown = ", ".join(f"{suffix} {count}" for suffix, count in kinds.most_common(4))
    return f"{len(names)}{'+' if len(names) >= SAMPLE_FILES else ''} files ({shown}{', …' if len(kinds) > 4 else ''})"


# --- text ----------------------------------------------------------------------------------------------------------


def _text(where: str, files: list[Path], folder: bool) -> dict[str, Any]:
    """source=text for one file, or a folder's train.*/val.*/dev.*/test.* files (in that order)."""
    if folder:
        splits = {_text_split(file.name) for file in files}
        if "train" not in splits or not splits & {"dev", "test"}:
            raise ConfigError(f"--data {where}: text files {', '.join(file.name for file in files)}, but a folder "
                              "needs train.* and test.* or dev.* (one file alone: give the file)")
    label = None
    texts: list[str] = []
    for file in files:
        columns = _columns(file)
        labels = [name for name in columns if name.lower() in LABEL_COLUMNS]
        if not labels:
            raise ConfigError(f"--data {file}: columns {', '.join(columns) or '(none)'}, none a label column (one of "
                              f"{', '.join(LABEL_COLUMNS)}): rename it, or init with --example sst2 and set "
                              "data.label_column")
        if label is not None and labels[0] != label:
            raise ConfigError(f"--data {file}: label column {labels[0]!r}, but {label!r} in {files[0].name}: "
                              "give the files one label column name")
        label = labels[0]
        others = [name for name in columns if name != label]
        if len(others) > 1:
            others = [name for name in others if name.lower() in TEXT_COLUMNS][:1] or others
        if len(others) != 1:
            raise ConfigError(f"--data {file}: columns {', '.join(columns)}: "
                              f"{'no text column' if not others else 'which is the text?'}: init with --example "
                              "sst2 and set data.text_column")
        if others[0] not in texts:
            texts.append(others[0])
    return {"source": "text", "text_files": where, "label_column": label,
            "text_column": texts[0] if len(texts) == 1 else texts}


def _columns(file: Path) -> list[str]:
    """A TSV/CSV file's header, or the keys of a JSONL file's first rows."""
    try:
        with open(file, encoding="utf-8-sig", errors="replace", newline="") as handle:
            if file.name.lower().endswith(".jsonl"):
                keys: dict[str, None] = {}
                for line in (line for line in (handle.readline() for _ in range(20)) if line.strip()):
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("a row is not an object")
                    keys.update(dict.fromkeys(row))
                return list(keys)
            header = next(csv.reader([handle.readline()], delimiter="\t" if file.suffix.lower() == ".tsv" else ","),
                          [])
            return [name.strip() for name in header]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--data {file}: unreadable ({exc}): give a TSV/CSV file with a header line, or JSONL "
                          "with one object per line") from None

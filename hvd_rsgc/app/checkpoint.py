"""Checkpoints of a run: atomic files, one main file (rank 0: model, optimizer, config,
history) plus one shard per rank (compressor residuals, RNG; decentralized: the rank's own
model), loaded with ``weights_only=True`` (a checkpoint cannot run code).

Layout: ``<run>/checkpoints/epochNNNN.pt`` and ``epochNNNN.rankRRR.pt``. Shards are written
first by every rank; the main file appears last, so its presence means the checkpoint is
complete. The last ``keep`` checkpoints are kept. A run never deletes or mixes with files it
did not write: a new run in a directory that has checkpoints, or a run resumed from an older
checkpoint than the directory's latest, first moves the files it would replace into
``<run>/checkpoints/<replaced|superseded>-<time>/`` (:func:`set_aside`).
"""
from __future__ import annotations

import errno
import os
import re
import time

import torch

CKPT_FORMAT = "hvd_rsgc.checkpoint/1"
SHARD_FORMAT = "hvd_rsgc.checkpoint-shard/1"
# epochs past 9999 and ranks past 999 get more digits: matched, and ordered by number
_MAIN_FILE = re.compile(r"epoch(\d{4,})\.pt")
_EPOCH_FILE = re.compile(r"epoch(\d{4,})(\.rank\d{3,})?\.pt$")


def _disk_full(e: BaseException, directory: str) -> bool:
    """Did ``e`` come from a full disk? torch.save reports one as a RuntimeError ("unexpected
    pos ..."), the file's own ENOSPC only in the exception's context; failing that, the disk's
    free space (read before the partial file is removed) tells."""
    seen = e
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        return False


def atomic_save(obj, path: str) -> str:
    """Write to ``path.tmp``, fsync, rename: a crash mid-write never destroys the last good
    file. On failure the temporary file is removed and the error names the path (and says
    so when the disk is full)."""
    tmp = path + ".tmp"
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:            # a file object: its ENOSPC reaches the context
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)                 # the rename itself, before older files go
    except (OSError, RuntimeError) as e:
        no_space = _disk_full(e, directory)
        _remove(tmp)
        why = "no space left on the device" if no_space else (
            "permission denied" if getattr(e, "errno", None) in (errno.EACCES, errno.EROFS)
            else str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise OSError(errno.ENOSPC if no_space else getattr(e, "errno", None) or errno.EIO,
                      f"cannot write checkpoint {path!r}: {why}") from e
    except BaseException:                     # an object that cannot be saved, Ctrl-C: no
        _remove(tmp)                          # stray .tmp beside the checkpoints
        raise
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                           # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def shard_path(main_path: str, rank: int) -> str:
    return main_path[: -len(".pt")] + f".rank{rank:03d}.pt"


def main_path(run_dir: str, epoch: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"epoch{epoch:04d}.pt")


def save_main(run_dir: str, epoch: int, payload: dict, keep: int) -> str:
    path = atomic_save(payload, main_path(run_dir, epoch))
    old = checkpoints(run_dir)[:-keep]
    gone = {int(_MAIN_FILE.fullmatch(os.path.basename(p)).group(1)) for p in old}
    for p in old:                                 # main files first: a checkpoint is complete
        os.remove(p)                              # only while its main file is there
    folder = os.path.dirname(path)
    for n in os.listdir(folder):                  # then their shards, in one listing
        m = _EPOCH_FILE.fullmatch(n)
        if m and m.group(2) and int(m.group(1)) in gone:
            os.remove(os.path.join(folder, n))
    return path


def set_aside(run_dir: str, after_epoch: int, why: str) -> tuple[str | None, list[str]]:
    """Move every checkpoint file of an epoch after ``after_epoch`` (-1: all), main files and
    shards, complete or not, into ``<run>/checkpoints/<why>-<time>/``. Returns that folder (None
    when nothing was there) and the names moved. Rank 0 calls it before anything is written."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if (m := _EPOCH_FILE.fullmatch(n)) and int(m.group(1)) > after_epoch)
    if not names:
        return None, []
    dest = base = os.path.join(folder, f"{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{base}-{n}"
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(dest, name))
    return dest, names


def checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (main files), oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    found = [(int(m.group(1)), n) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := _MAIN_FILE.fullmatch(n))]
    return [os.path.join(folder, n) for _, n in sorted(found)]


def load(path: str, kind: str = CKPT_FORMAT) -> dict:
    """Load one checkpoint file; a clear ``ValueError`` naming it when it is empty, truncated,
    not ours or contains code."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FileNotFoundError(f"checkpoint {path!r} cannot be read: {e.strerror}") from None
    if size == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): it was not written completely")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # noqa: BLE001 - truncated zip, pickle refused, ...
        first = next(iter(str(e).splitlines()), "") or type(e).__name__
        raise ValueError(f"checkpoint {path!r} is unreadable or not a hvd_rsgc checkpoint "
                         f"(truncated, or contains code): {first[:200]}") from None
    if not isinstance(ck, dict) or ck.get("format") != kind:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"checkpoint {path!r} is not a hvd_rsgc checkpoint (format {got!r})")
    return ck


def resolve(resume: str) -> tuple[str, str]:
    """``--resume`` names a run directory (its latest checkpoint) or one main checkpoint file.
    Returns ``(run_dir, main checkpoint path)``; the latest is loaded-checked here so that a
    damaged file is reported with the older checkpoint offered instead."""
    if os.path.isfile(resume):
        path = os.path.abspath(resume)
        if os.path.basename(os.path.dirname(path)) != "checkpoints" \
                or not _MAIN_FILE.fullmatch(os.path.basename(path)):
            raise ValueError(f"--resume {resume!r}: a checkpoint file is resumed where the run "
                             "wrote it, <run>/checkpoints/epochNNNN.pt, with its rank shards "
                             "beside it (the continued run writes into <run>); pass that file "
                             "or the run directory")
        return os.path.dirname(os.path.dirname(path)), path
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such run directory or checkpoint file")
    files = checkpoints(resume)
    if not files:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(resume, 'checkpoints')!r}")
    try:
        load(files[-1])
    except ValueError as e:
        older = f"; the previous checkpoint is {files[-2]!r}: resume from it with --resume " \
                f"{files[-2]} (and remove the damaged file)" if len(files) > 1 else \
                "; there is no older checkpoint"
        raise ValueError(f"{e}{older}") from None
    return resume, files[-1]

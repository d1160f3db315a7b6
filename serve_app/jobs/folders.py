"""The jobs' data folder (the filesystem broker's messages and the job records) kept private
to the server's user: another local user who could write there could queue jobs, or write a
record whose webhook the server would then sign and post."""

from __future__ import annotations

import os
import stat


class DataFolderError(RuntimeError):
    """A data folder the server will not use: the message says why and what to do."""


def _refuse_if_others_may_write(path: str, info: os.stat_result, uid: int) -> None:
    """A folder above the data folder: its owner the server's user or root, and if its group
    or others may write to it, sticky (as /tmp is: they cannot rename or remove what is not
    theirs)."""
    if info.st_uid not in (uid, 0):
        raise DataFolderError(
            f"{path}, above the jobs' data folder, belongs to uid {info.st_uid}: that user could "
            "replace the data folder. Set jobs.data_folder to a folder of the server's own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise DataFolderError(
            f"{path}, above the jobs' data folder, may be written by its group or by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}, not sticky): they could replace the data "
            "folder. Set jobs.data_folder to a folder of the server's own")


def private_folder(path: str | os.PathLike) -> str:
    """``path``, created if missing with mode 0700 (and so are its missing parents);
    :class:`DataFolderError` if another user owns it, its group or others may write to it,
    or a folder above it is another user's (root's aside) or writable by others without the
    sticky bit, or it is a link another user made. The folders checked are the real ones
    (links followed). Returns the path
    as a string."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)  # the umask may have taken bits off; never adds any here
        except FileExistsError:  # made meanwhile (another replica): checked below
            pass
    uid = os.geteuid()
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
        raise DataFolderError(f"{path} is a link that uid {link.st_uid} made (and may point "
                              "elsewhere at any time); set jobs.data_folder to a folder of the "
                              "server's own")
    real = os.path.realpath(path)
    info = os.stat(real)
    if not stat.S_ISDIR(info.st_mode):
        raise DataFolderError(f"{path} is not a folder (jobs.data_folder)")
    if info.st_uid != uid:
        raise DataFolderError(
            f"{path} belongs to uid {info.st_uid}, not to the server's user (uid {uid}): another "
            "user could write jobs and their webhooks there. Remove it, or set jobs.data_folder "
            "to a folder of the server's own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DataFolderError(
            f"{path} may be written by its group or by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): another user could write jobs and their webhooks "
            f"there. chmod 700 {path}")
    above = os.path.dirname(real)
    while True:
        _refuse_if_others_may_write(above, os.stat(above), uid)
        if above == os.path.dirname(above):
            return path
        above = os.path.dirname(above)

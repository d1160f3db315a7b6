"""The jobs' data folder (serve_app/jobs/folders.py): made private to the server's user, and
refused when another user owns it or may write to it, or to a folder above it."""

import os
import stat

import pytest

from serve_app.jobs.folders import DataFolderError, private_folder


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_data_folder_and_its_missing_parents_are_private(tmp_path):
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o000)  # the most permissive umask: 0700 is set, not left to it
    try:
        folder = private_folder(tmp_path / "a" / "jobs")
    finally:
        os.umask(old)
    assert folder == str(tmp_path / "a" / "jobs")
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "jobs") == 0o700
    assert private_folder(folder) == folder  # an existing one of ours: used as it is


@pytest.mark.parametrize("bits", [0o770, 0o707, 0o777, 0o1777])
def test_a_data_folder_others_may_write_to_is_refused(tmp_path, bits):
    folder = tmp_path / "jobs"
    folder.mkdir()
    os.chmod(folder, bits)
    with pytest.raises(DataFolderError, match="may be written by its group or by others"):
        private_folder(folder)


def test_a_data_folder_another_user_owns_is_refused(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)  # nobody's
        with pytest.raises(DataFolderError, match="belongs to uid 65534"):
            private_folder(folder)
        inner = folder / "state"  # ours, inside nobody's folder: nobody could replace it
        inner.mkdir(mode=0o700)
        with pytest.raises(DataFolderError, match="above the jobs' data folder, belongs to uid 65534"):
            private_folder(inner)
    else:  # a folder root owns stands for another user's
        with pytest.raises(DataFolderError, match="belongs to uid 0"):
            private_folder("/usr")


def test_a_folder_above_others_may_write_to_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(DataFolderError, match="above the jobs' data folder, may be written"):
        private_folder(shared / "jobs")
    os.chmod(shared, 0o1777)  # as /tmp is
    assert private_folder(shared / "jobs2")


def test_a_link_another_user_made_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a link owned by another user needs root")
    target = tmp_path / "ours"
    target.mkdir(mode=0o700)
    link = tmp_path / "jobs"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)
    with pytest.raises(DataFolderError, match="is a link that uid 65534 made"):
        private_folder(link)


def test_the_broker_and_the_state_refuse_a_folder_others_may_write_to(tiny_args, tmp_path):
    from serve_app.config import load_app_config
    from serve_app.jobs.broker import task_processor_config
    from serve_app.jobs.store import state_backend

    folder = tmp_path / "jobs"
    folder.mkdir()
    os.chmod(folder, 0o777)
    jobs = load_app_config({**tiny_args, "jobs": {**tiny_args["jobs"], "data_folder": str(folder)}}).jobs
    with pytest.raises(DataFolderError):
        task_processor_config(jobs)
    with pytest.raises(DataFolderError):
        state_backend(jobs)
    os.chmod(folder, 0o700)
    task_processor_config(jobs)
    state_backend(jobs)
    assert mode(folder / "state") == 0o700

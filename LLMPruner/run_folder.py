"""A run's output folder that always describes one complete run (hf_prune.py's ``prune_log/<name>``).

A run writes everything (command.txt, args.json, prune.log, plan.json, results.json, the pruned model)
into a hidden sibling ``prune_log/.<name>.tmp-<pid>`` and ``commit`` moves it into place as a whole,
replacing the previous run of that name only then. A run that fails before ``commit`` leaves the
previous folder untouched and its own files in ``prune_log/<name>.failed`` (``abandon``), so its log
can be read. Temporary siblings of processes that no longer exist (a killed run) are removed by the
next run of the same name.

    run = RunFolder(Path("prune_log/llama_prune"))   # run.path: the temporary sibling
    ...write into run.path...
    run.commit()                                     # run.path is now prune_log/llama_prune
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class RunFolder:
    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        if self.final.exists() and not self.final.is_dir():
            raise FileExistsError(f"run folder {self.final}: exists and is not a folder "
                                  "(choose another --save_ckpt_log_name or --log_dir)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.path = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        self.committed = False

    @property
    def failed(self) -> Path:
        return self.final.parent / f"{self.final.name}.failed"

    def commit(self) -> Path:
        """Move the run into place (replacing a previous run of the same name); returns the folder."""
        assert not self.committed, self.final
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        replaced = self.final.exists()
        if replaced:
            os.replace(self.final, old)  # both renames stay inside one folder: atomic on POSIX
        os.replace(self.path, self.final)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("replaced the previous run in %s", self.final)
        self.path, self.committed = self.final, True
        return self.final

    def abandon(self) -> Path | None:
        """After a failure: keep the unfinished run's files in ``<name>.failed``, the old run in place."""
        if self.committed:
            return None
        shutil.rmtree(self.failed, ignore_errors=True)
        os.replace(self.path, self.failed)
        logger.error("the run failed: %s is unchanged; this run's files are in %s", self.final, self.failed)
        self.path = self.failed
        return self.failed

    def _remove_stale(self) -> None:
        for kind in ("old", "tmp"):
            for stale in self.final.parent.glob(f".{self.final.name}.{kind}-*"):
                pid = stale.name.rsplit("-", 1)[-1]
                if not pid.isdigit() or _alive(int(pid)):
                    continue
                if kind == "old" and not self.final.exists():  # killed between commit's two renames
                    os.replace(stale, self.final)
                    logger.warning("restored %s from an interrupted commit", self.final)
                else:
                    shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["RunFolder"]

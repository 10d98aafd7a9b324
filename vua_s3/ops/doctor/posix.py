"""The POSIX doctor: the directory, the file mode, a round trip and the free space."""

from __future__ import annotations

import contextlib
import os
import time
import uuid

from ...storage import ObjectInfo
from ...storage.posix import FILE_MODE, PosixStore
from .common import FAIL, PASS, WARN, Check, fragment_round_trip
from .refresh import refresh_check


async def posix_checks(store: PosixStore) -> list[Check]:
    checks = [Check("directory", PASS, str(store.root))]
    key = f".vua-doctor/{uuid.uuid4().hex}"
    payload = os.urandom(64 << 10)
    try:
        await store.put(key, payload)
        mode = os.stat(store.root / key).st_mode & 0o777
        checks.append(Check("put", PASS, f"{len(payload)} bytes, mode {mode:o}"))
        if mode != FILE_MODE:
            checks.append(Check("file mode", WARN, f"{mode:o}, expected {FILE_MODE:o}", "check the umask or ACLs"))
        same = await store.get(key) == payload
        checks.append(Check("get", PASS if same else FAIL, "content matches" if same else "content differs"))
        await store.delete(key)
        checks.append(Check("delete", PASS, "scratch file removed"))
        checks.append(await fragment_round_trip(store, cleanup=lambda keys: _remove_empty_directories(store, keys)))
        checks.append(await _refresh(store, key + "-refresh"))
    except Exception as exc:
        checks.append(Check("access", FAIL, str(exc), f"let this user create files under {store.root}"))
    finally:
        with contextlib.suppress(Exception):
            await store.delete(key)
            (store.root / ".vua-doctor").rmdir()
    usage = os.statvfs(store.root)
    free = usage.f_bavail * usage.f_frsize
    checks.append(Check("free space", PASS if free > 1 << 30 else WARN, f"{free / (1 << 30):.1f} GiB", "free space"))
    return checks


async def _refresh(store: PosixStore, key: str) -> Check:
    """What ``refresh_after`` needs: the file's mtime set (it is made an hour old first), its
    bytes, mode and owner kept."""

    async def age(info: ObjectInfo) -> None:
        then = time.time() - 3600
        os.utime(store.root / key, (then, then), follow_symlinks=False)

    def describe(key: str) -> dict[str, object]:
        st = os.stat(store.root / key, follow_symlinks=False)
        return {"mode": oct(st.st_mode), "owner": st.st_uid}

    fix = "refresh files as their owner (the writer's user) or make them writable to the readers' group"
    return await refresh_check(store, key, age, describe, denied_fix=fix)


async def _remove_empty_directories(store: PosixStore, keys: list[str]) -> None:
    """The fan-out and namespace directories the round trip's keys left, if empty."""
    for key in keys:
        for directory in (store.root / key).parents[:2]:
            with contextlib.suppress(OSError):
                directory.rmdir()

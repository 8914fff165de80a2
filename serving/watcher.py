"""Hot reload: poll each served model's aliases/champion.json and load + swap when it names another version;
pick up model names registered since the last poll. With serve.challenger shadow or canary, the challenger alias is
followed the same way (and looked at again whenever the champion changes: a challenger promoted to champion stops
being one).

Polling (stat every serve.reload_poll_s) rather than inotify: it works on every filesystem a registry may
live on (NFS, bind mounts, object-store fuse), and the alias is replaced with os.replace, so a changed
(mtime, size, inode) is a complete new file. A failed load is reported once per alias change, not per poll.
A single-model registry moved under models/<name>/ by the writer changes the alias's path and inode: the
reload that follows finds the same version and keeps the loaded one.
"""

from __future__ import annotations

import asyncio
import logging

from tuneline.serving.errors import ServingError
from tuneline.serving.model_holder import CHALLENGER, CHAMPION, ModelHolder

log = logging.getLogger("tuneline.serving.watcher")


async def watch_champion(holder: ModelHolder, poll_s: float) -> None:
    """Load every champion now, then follow the aliases until cancelled (poll_s = 0: load once, do not watch)."""
    seen: dict[str, object] = {}
    seen_challenger: dict[str, object] = {}
    follow_challenger = holder.settings.challenger != "off"
    warned = False
    while True:
        try:
            names = holder.refresh()
        except OSError:
            log.exception("registry unreadable", extra={"event": "watch_error"})
            names = holder.names
        for name in names:
            slot = holder.slots[name]
            signature = slot.registry.alias_signature(CHAMPION)
            if name in seen and signature == seen[name]:
                if follow_challenger:
                    await _follow_challenger(holder, name, seen_challenger)
                continue
            seen[name] = signature
            try:
                model = await holder.reload_champion(name, source="watch")
                if model is None:
                    log.warning("no champion alias yet", extra={"event": "no_champion", "model": name,
                                                                "alias": str(slot.registry.alias_path(CHAMPION))})
            except ServingError:
                pass  # already logged and counted by the holder; the old champion keeps serving
            except Exception:  # never let the watcher die: the server would silently stop following the registry
                log.exception("champion reload crashed", extra={"event": "watch_error", "model": name})
            if follow_challenger:
                await _follow_challenger(holder, name, seen_challenger)
        if not names and not warned:
            warned = True
            log.warning("no model in the registry yet", extra={"event": "no_champion",
                                                               "registry": str(holder.settings.registry)})
        if poll_s <= 0:
            return
        await asyncio.sleep(poll_s)


async def _follow_challenger(holder: ModelHolder, name: str, seen: dict[str, object]) -> None:
    """Load the version `name`'s challenger alias names when it (or the champion) changed since the last poll."""
    slot = holder.slots[name]
    signature = (slot.registry.alias_signature(CHALLENGER), slot.champion.version if slot.champion else None)
    if seen.get(name) == signature:
        return
    seen[name] = signature
    try:
        await holder.reload_challenger(name, source="watch")
    except ServingError:
        pass  # logged and counted by the holder; the champion serves every request meanwhile
    except Exception:  # noqa: BLE001 - as for the champion: the watcher must not die
        log.exception("challenger reload crashed", extra={"event": "watch_error", "model": name})

"""Put on PYTHONPATH by tests (tests/module_copies.py): each Python process of a run records the modules it loaded.

With TUNELINE_MODULE_LOG set to a folder, every interpreter that starts (the `tuneline` CLI, Prefect's flow, DVC's
stage commands, tuning workers) writes {module name: file} to <folder>/<pid>.json when it exits, so a test can
check that no file of Tuneline's was imported under two names (two copies of every class in it).
"""

import atexit
import json
import os
import sys


def _record() -> None:
    folder = os.environ.get("TUNELINE_MODULE_LOG")
    if not folder:
        return
    loaded = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    path = os.path.join(folder, f"{os.getpid()}.json")
    try:
        with open(path + ".tmp", "w") as out:
            json.dump({"argv": sys.argv, "modules": {k: v for k, v in loaded.items() if v}}, out)
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a folder removed under a late-exiting process: nothing to record


if os.environ.get("TUNELINE_MODULE_LOG"):
    atexit.register(_record)

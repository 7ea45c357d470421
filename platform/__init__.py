"""Driver-side package of the platform, and a stand-in for the standard library's ``platform``.

``python -m platform.sweep`` puts the repository root first on ``sys.path``, so this
package shadows the standard library module of the same name for *every* library
in the process (torch, ray and mlflow call ``platform.system()`` and friends), and
for Ray workers whose working directory is the repository (``ray job submit
--working-dir .``). We therefore load the standard library's ``platform.py`` from
its file and re-export all of its names, so that both ``import platform;
platform.system()`` and ``import platform.sweep`` work.

Keep this file tiny and free of dependencies: it runs inside ``import ray`` on
workers, before anything else of the project can be imported.
"""

import importlib.util as _importlib_util
import os as _os
import sysconfig as _sysconfig

_STDLIB_PLATFORM_PATH = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")
_spec = _importlib_util.spec_from_file_location("_stdlib_platform", _STDLIB_PLATFORM_PATH)
_stdlib_platform = _importlib_util.module_from_spec(_spec)
_spec.loader.exec_module(_stdlib_platform)

# Re-export every public and private name (some libraries use private helpers such as
# ``platform._syscmd_ver``), but never overwrite this package's own module attributes.
for _name, _value in vars(_stdlib_platform).items():
    if _name not in {"__name__", "__file__", "__spec__", "__loader__", "__path__", "__package__", "__doc__", "__builtins__", "__cached__"}:
        globals()[_name] = _value

del _name, _value, _spec

"""Reading JSON objects with one-line errors, and atomic file writes: a temporary file in the same
folder, renamed over the target when complete, so that a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitnet158.errors import UserError


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; any problem is a `UserError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def write_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """Call `write(temporary_path)`, then rename the result to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))

"""The shared ``main`` of the launch scripts: logging, one argument parse, and errors turned into exit codes
with a message that names the rank (so a multi-rank job says which rank failed and why)."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from .errors import QLoRADSError

log = logging.getLogger("qlora_ds")


def run_main(body: Callable[[Any], Any], parse_args: Callable[[Any], Any], argv=None,
             exit_code: Callable[[Any], int] = lambda result: 0) -> int:
    """Exit 0 (or ``exit_code(result)``); 2 for bad input/config (QLoRADSError); 1 for any other failure."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(argv)
    who = f"rank {os.environ['RANK']}" if "RANK" in os.environ else "qlora-ds"
    try:
        result = body(args)
    except QLoRADSError as err:
        log.error("%s: %s", who, err)
        return 2
    except Exception as err:  # noqa: BLE001 - name the rank and the cause, then fail the whole job
        log.exception("%s failed: %s: %s", who, type(err).__name__, err)
        return 1
    return exit_code(result)

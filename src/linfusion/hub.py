"""Turning Hub and file-system load failures into messages that say what to do."""

from __future__ import annotations

import os
import re


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing local path."""
    # a Hub name never starts with "." or "-", so ./models/x and ../x are paths
    return re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", source) is not None and not os.path.exists(source)


def load_failure_message(what: str, source: str, error: Exception, folder_needs: str) -> str:
    """``could not load WHAT from SOURCE: <why and what to do>. (<original error>)``.

    ``folder_needs`` names the files a local folder must hold (for the existing-folder case).
    """
    if not looks_like_hub_id(source):
        hint = "no such folder" if not os.path.exists(source) else f"the folder needs {folder_needs}"
    elif hub_offline():
        hint = (
            "the Hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local cache; download it where "
            f"you have network (`hf download {source}`) or pass a local folder"
        )
    else:
        hint = "it could not be fetched from the Hub (check the id, your network and your token)"
    return f"could not load {what} from {source!r}: {hint}. ({type(error).__name__}: {error})"

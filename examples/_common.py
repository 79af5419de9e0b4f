"""Shared bits of the example scripts: fast mode and figure saving."""
import os

FAST = os.environ.get("PURENET_FAST") == "1"  # CI's fast mode: fewer epochs, same code


def epochs(default, fast=2):
    return fast if FAST else default


def save(fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")

import os
import subprocess
import sys

import pytest

from tqstore.prefix_hash import Namespace, hash_block_tokens, hash_prefix_blocks, token_bytes


def _ns(**kw):
    base = dict(model_fingerprint="smollm2-abc", num_layers=30, num_kv_heads=3, head_dim=64,
                block_size=4)
    base.update(kw)
    return Namespace(**base)


def test_only_full_blocks_are_hashed_and_chain_prefixes_agree():
    ns = _ns()
    long = hash_prefix_blocks(ns, list(range(11)))
    assert len(long) == 2
    assert hash_prefix_blocks(ns, list(range(8))) == long
    assert hash_prefix_blocks(ns, [0, 1, 2, 3, 9, 9, 9, 9])[0] == long[0]
    assert hash_prefix_blocks(ns, [0, 1, 2, 3, 9, 9, 9, 9])[1] != long[1]
    assert long[1] == hash_block_tokens(long[0], [4, 5, 6, 7])


@pytest.mark.parametrize("change", [dict(model_fingerprint="other"), dict(num_layers=29),
                                    dict(num_kv_heads=4), dict(head_dim=128), dict(block_size=8),
                                    dict(kv_dtype="bfloat16"), dict(format_version=2),
                                    dict(extra=(("codec", "k4v4"),))])
def test_any_namespace_change_changes_every_hash(change):
    tokens = list(range(16))
    assert set(hash_prefix_blocks(_ns(), tokens[:8])).isdisjoint(
        hash_prefix_blocks(_ns(**change), tokens[:8] if "block_size" not in change else tokens))


def test_stable_across_processes_and_pinned():
    code = ("from tqstore.prefix_hash import *;"
            "ns=Namespace('smollm2-abc',30,3,64,4);print(hash_prefix_blocks(ns,list(range(8)))[1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    here = hash_prefix_blocks(_ns(), list(range(8)))[1].hex()
    assert out.stdout.strip() == here == PINNED


PINNED = "b0cdc131b0a43ad329176d9dc59ab397b682d3ad53d971ef486b9870d8d4e46c"


def test_token_encoding_is_fixed_width_little_endian_and_checked():
    assert token_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    with pytest.raises(ValueError):
        token_bytes([-1])
    with pytest.raises(ValueError):
        token_bytes([2**32])


def test_namespace_validation():
    with pytest.raises(ValueError):
        _ns(block_size=0)
    with pytest.raises(ValueError):
        _ns(model_fingerprint="")
    assert _ns().with_extra(codec="x").extra == (("codec", "x"),)

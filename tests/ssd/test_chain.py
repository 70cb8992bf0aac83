import numpy as np
import pytest

from tqstore.errors import InvalidArgument
from tqstore.prefix_hash import hash_prefix_blocks
from tqstore.ssd.chain import chain_hashes, token_array

from .conftest import NS


@pytest.mark.parametrize("n", [0, 7, 8, 9, 64, 1001])
def test_fast_chain_equals_the_definition(rng, n):
    toks = rng.integers(0, 2**32, n, dtype=np.uint64).tolist()
    assert chain_hashes(NS, token_array(toks)) == hash_prefix_blocks(NS, toks)
    assert chain_hashes(NS, token_array(np.array(toks, dtype=np.uint32))) == hash_prefix_blocks(NS, toks)


def test_chain_limit(rng):
    toks = token_array(rng.integers(0, 1000, 80))
    assert chain_hashes(NS, toks, 3) == chain_hashes(NS, toks)[:3]


@pytest.mark.parametrize("bad", [[-1], [2**32], ["x"]])
def test_out_of_range_tokens_are_invalid(bad):
    with pytest.raises(InvalidArgument):
        token_array(bad)

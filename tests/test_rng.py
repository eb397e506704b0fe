"""Seeds of derived random streams: one function of (seed, purpose, step), in range, distinct, reproducible."""
import pytest
import torch

from sdekit.rng import SEED_PURPOSES, derive_seed


def test_derived_seeds_are_reproducible_in_range_and_distinct_per_step():
    for purpose in SEED_PURPOSES:
        keys = (1, 0) if purpose == "network_rng" else ()
        for seed in (0, 1, 2**40):
            seeds = [derive_seed(seed, purpose, step, *keys) for step in range(200)]
            assert seeds == [derive_seed(seed, purpose, step, *keys) for step in range(200)]
            assert all(0 <= s < 2**63 - 1 for s in seeds)
            assert len(set(seeds)) == len(seeds), purpose
            torch.Generator().manual_seed(seeds[-1])        # a valid torch seed


def test_keys_and_seeds_give_other_streams():
    assert len({derive_seed(0, "network_rng", 5, k, r) for k in range(4) for r in range(4)}) == 16
    assert len({derive_seed(s, p, 3) for s in range(50) for p in ("train_step", "dropout", "fresh_data")}) == 150
    assert derive_seed(0, "dropout", 0) != derive_seed(0, "network_rng", 0)


def test_unknown_purpose_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown seed purpose 'nope'; expected one of .*'train_step'"):
        derive_seed(0, "nope")

"""Tests a GPU run must pass (skipped without CUDA), and the device axis of the test matrix (runs everywhere).

Run on a GPU machine with TRITON_INTERPRET=0 so that the Triton kernels are compiled for the device.
"""
import pytest
import torch

from gmd_ext import testing


def test_matrix_lists_every_cell():
    params = testing.device_backends()
    ids = [p.id for p in params]
    assert ids == [f"{d}-{b}" for d in testing.DEVICE_IDS for b in testing.BACKEND_IDS]
    for p in params:
        ok, reason = testing.case_status(*p.values)
        assert bool(p.marks) == (not ok)
        if not ok:
            assert reason and p.marks[0].kwargs["reason"] == reason
    assert torch.device("cpu") in testing.devices()
    assert testing.case_status("cpu", "torch") == (True, None)
    if not torch.cuda.is_available():
        assert not testing.device_status("cuda")[0] and not testing.device_status("cuda:1")[0]

"""Infrastructure every layer may use and that knows nothing of robustness: errors, atomic files, output folders
and their locks, the resume journal, the checkpoint digest, devices and threads, torchrun, the allocator, the
version. It imports nothing else of robustprune (tests/unit/test_floors.py)."""

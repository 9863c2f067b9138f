"""The model benchmark's worker environments (`benchmarks/model_benchmark.py`).

The benchmark's absl flags would clash with the programs' flags in this process, so the
module is imported in a fresh interpreter.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

_PROBE = """
import json, os
from benchmarks import model_benchmark
cases = {}
for user_value in (None, 'glibc.malloc.arena_max=2', 'glibc.malloc.hugetlb=0'):
    if user_value is None:
        os.environ.pop('GLIBC_TUNABLES', None)
    else:
        os.environ['GLIBC_TUNABLES'] = user_value
    for kind in ('jax', 'torch'):
        for huge in (False, True):
            env = model_benchmark.worker_environment(kind, huge)
            cases[f'{user_value}|{kind}|{huge}'] = env.get('GLIBC_TUNABLES')
            assert env.get('PATH') == os.environ.get('PATH')
print(json.dumps(cases))
"""


def test_only_jax_workers_get_huge_pages_and_the_users_tunables_are_kept():
    out = subprocess.run(
        [sys.executable, '-c', _PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    cases = json.loads(out.strip().splitlines()[-1])
    assert cases == {
        'None|jax|False': None,
        'None|jax|True': 'glibc.malloc.hugetlb=1',
        'None|torch|False': None,
        'None|torch|True': None,
        'glibc.malloc.arena_max=2|jax|False': 'glibc.malloc.arena_max=2',
        'glibc.malloc.arena_max=2|jax|True': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1',
        'glibc.malloc.arena_max=2|torch|False': 'glibc.malloc.arena_max=2',
        'glibc.malloc.arena_max=2|torch|True': 'glibc.malloc.arena_max=2',
        # A huge-page setting the user chose is theirs.
        'glibc.malloc.hugetlb=0|jax|True': 'glibc.malloc.hugetlb=0',
        'glibc.malloc.hugetlb=0|jax|False': 'glibc.malloc.hugetlb=0',
        'glibc.malloc.hugetlb=0|torch|False': 'glibc.malloc.hugetlb=0',
        'glibc.malloc.hugetlb=0|torch|True': 'glibc.malloc.hugetlb=0',
    }

#!/usr/bin/env bash
# Mutation testing of one part of bam within a time budget (too slow for CI; a developer's habit):
#
#     tests/mutation.sh PATH [BUDGET_S]        e.g.  tests/mutation.sh bam/losses 1800
#
# PATH is a package folder (bam/losses) or a module file (bam/data/cpu_augment.py). mutmut (the
# `dev` extra: pip install -e .[dev]) mutates only PATH, in a scratch copy of this checkout so the
# worktree never holds mutated code, and runs against each mutant only the fast tests (not `slow`,
# not `distributed`, settings in setup.cfg's [mutmut]) of the test files that name PATH's package
# (`bam.losses`, `bam.data`, ...): a file found by name keeps working when modules move. Set TESTS
# to a space-separated list of test files to choose them yourself, and MUTANTS to a space-separated
# list of mutant-name patterns to check only some functions (MUTANTS='*linear_ramp__mutmut_*').
# Set SAMPLE=N to check a uniform random sample of N of PATH's mutants (of those MUTANTS matches, if
# set) instead of all of them, SEED to choose another sample: a whole package's kill rate within a
# budget that could not check every mutant. The counts printed last are then the sample's.
#
# Modules that define a LightningModule (bam/methods) run too: mutmut moves a mutated `__init__`'s
# body into a renamed copy behind a trampoline, where Lightning's save_hyperparameters no longer
# finds the constructor's arguments; the pytest plugin tests/helpers/mutmut_plugin.py (loaded
# with -p in every run of this script, and only here) teaches it those frames. mutmut leaves
# decorated functions (`@torch.no_grad()`) unmutated: they count nowhere, check them by hand.
#
# When the budget runs out mutmut is stopped and the mutants it did not reach are counted as "not
# checked". The per-status counts are printed last; `mutmut show NAME` in the scratch folder (printed
# too) shows a surviving mutant's diff, `mutmut results` lists them.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: tests/mutation.sh PATH [BUDGET_S]   (PATH: bam/losses, bam/data/cpu_augment.py, ...)" >&2
    exit 2
fi
target=${1%/}
budget=${2:-3600}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}

if [[ ! -e $repo/$target || $target != bam/* ]]; then
    echo "tests/mutation.sh: $target is not a folder or file under bam/ of $repo" >&2
    exit 2
fi
if ! "$python" -c "import mutmut" 2>/dev/null; then
    echo "tests/mutation.sh: mutmut is not installed for $python; pip install -e '.[dev]'" >&2
    exit 2
fi

if [[ -d $repo/$target ]]; then
    package=${target//\//.}
    only_mutate="$target/*"
else
    package=$(dirname "$target"); package=${package//\//.}
    only_mutate=$target
fi
if [[ -z ${TESTS:-} ]]; then
    TESTS=$(cd "$repo" && grep -rl --include='test_*.py' -E "${package//./\\.}([^a-zA-Z_]|$)" tests | sort | tr '\n' ' ' || true)
fi
if [[ -z ${TESTS// /} ]]; then
    echo "tests/mutation.sh: no test file names $package; set TESTS" >&2
    exit 2
fi

scratch=$(mktemp -d "/tmp/bam-mutation-${target//\//-}.XXXX")
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch")
# only_mutate and the test files of this run, one per line as mutmut reads lists
"$python" - "$scratch/setup.cfg" "$only_mutate" $TESTS <<'EOF'
import configparser, sys
path, only_mutate, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
config = configparser.ConfigParser()
config.read(path)
config["mutmut"]["only_mutate"] = only_mutate
config["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
# Lightning's save_hyperparameters must see through mutmut's trampolines (see the comment above), and
# no test may leave a child process for mutmut's os.wait() to take for a mutant's run
config["mutmut"]["pytest_add_cli_args"] += "\n-p\nmutmut_plugin"
with open(path, "w") as handle:
    config.write(handle)
EOF

echo "mutating $only_mutate against: $TESTS"
echo "scratch copy: $scratch (budget ${budget} s)"
cd "$scratch"
# the scratch copy, not the editable install, is the bam that the tests import
export PYTHONPATH="$scratch/mutants:$scratch/mutants/tests:$scratch/mutants/tests/helpers"
# mutmut forks each mutant's run from a process that has already run the tests: a torch (OpenMP)
# thread pool started before the fork leaves the child waiting forever on its locks (mutants of
# bam/training/schedules.py hung at 0% CPU that way), and one thread also keeps the run light
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mutmut_run() {
    local left=$(( budget - SECONDS ))
    (( left > 0 )) || return 124
    local patterns=()
    read -r -a patterns <<< "${MUTANTS:-}"  # split on spaces, patterns left unexpanded
    timeout --signal=INT --kill-after=60 "$left" "$(dirname "$python")/mutmut" run --max-children 1 "${patterns[@]}"
}
mutmut_results() {
    "$(dirname "$python")/mutmut" results --all true > "$1" 2>&1 || true
}
SECONDS=0
status=0
if [[ -n ${SAMPLE:-} ]]; then
    # A run filtered on a name no mutant has generates every mutant and maps tests to functions,
    # then stops on mutmut's "nothing matches" check: the full list to draw the sample from.
    echo "generating every mutant of $only_mutate to draw a sample of $SAMPLE (seed ${SEED:-0})"
    MUTANTS=__bam_no_such_mutant__ mutmut_run > sample-probe.log 2>&1 || true
    grep -q "nothing matches" sample-probe.log || MUTANTS=__bam_no_such_mutant__ mutmut_run >> sample-probe.log 2>&1 || true
    mutmut_results all-mutants.txt
    MUTANTS=$("$python" - all-mutants.txt "$SAMPLE" "${SEED:-0}" "${MUTANTS:-}" <<'EOF2'
import fnmatch, random, sys
path, size, seed, patterns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
names = sorted(line.split(":")[0].strip() for line in open(path) if line.startswith("    "))
names = [n for n in names if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns)]
if not names:
    sys.exit(f"tests/mutation.sh: no mutants to sample from (see {path} and sample-probe.log)")
print(" ".join(random.Random(seed).sample(names, min(size, len(names)))))
print(f"sampled {min(size, len(names))} of {len(names)} mutants (sample.txt)", file=sys.stderr)
EOF2
)
    tr ' ' '\n' <<< "$MUTANTS" > sample.txt
fi
mutmut_run || status=$?
if [[ $status -ne 0 && $status -ne 124 ]]; then
    # mutmut 3.8.1's first run in a fresh copy can fail its test-mapping step with pytest's usage
    # error; the second run (mutants already generated) goes through
    echo "mutmut stopped with status $status; running it once more"
    status=0
    mutmut_run || status=$?
fi
if [[ $status -eq 124 ]]; then
    echo "budget of ${budget} s spent: the mutants not reached are 'not checked'"
fi
mutmut_results results.txt
if [[ -n ${SAMPLE:-} ]]; then
    awk 'NR == FNR { sampled[$1]; next } { name = $1; sub(/:$/, "", name) } name in sampled' \
        sample.txt results.txt > sample-results.txt
    echo "per status of the sample (sample-results.txt in $scratch):"
    sed -n 's/.*: //p' sample-results.txt | sort | uniq -c
else
    echo "per status (results.txt in $scratch):"
    sed -n 's/.*: //p' results.txt | sort | uniq -c
fi

"""The docs' own shell workflow (curl + jq, from the rollout docs page) against the emulator.

The script is the docs' four steps and pagination loop, changed only where it must be: the
base URL comes from ``BREAD_BASE_URL``, the 10 s poll sleep is a variable, the pagination loop
uses ``jq -c`` so that one trajectory is one line, and ``set -euo pipefail`` stops it at the
first failure. ``.ci/run`` installs curl and jq where they are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from breadasync.emulator import Emulator, TargetPlan

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="the docs' workflow needs curl and jq on PATH (apt-get install curl jq)",
)

DOCS_WORKFLOW = r"""
set -euo pipefail
BASE="$BREAD_BASE_URL"

# 1. Verify stim complete
stim_response=$(curl -s -X GET "$BASE/v1/repo/my_repo/targets/coding_target/stim" \
  -H "Authorization: Bearer $BREAD_API_KEY")
stim_status=$(echo "$stim_response" | jq -r '.status')
if [ "$stim_status" != "complete" ]; then
  echo "Stim job must complete before rollout"
  exit 1
fi
stim_lines=$(echo "$stim_response" | jq -r '.lines')
echo "Stim complete with $stim_lines stimuli"

# 2. Start rollout job
curl -s -X POST "$BASE/v1/repo/my_repo/targets/coding_target/rollout" \
  -H "Authorization: Bearer $BREAD_API_KEY"
echo

# 3. Poll status
while true; do
  response=$(curl -s -X GET "$BASE/v1/repo/my_repo/targets/coding_target/rollout" \
    -H "Authorization: Bearer $BREAD_API_KEY")
  status=$(echo "$response" | jq -r '.status')
  lines=$(echo "$response" | jq -r '.lines')
  if [ "$status" = "complete" ]; then
    echo "Complete! Generated $lines trajectories"
    break
  fi
  echo "Status: $status, Lines: $lines"
  sleep "$POLL_SECONDS"
done

# 4. Fetch output
curl -s -X GET "$BASE/v1/repo/my_repo/targets/coding_target/rollout/output?limit=100" \
  -H "Authorization: Bearer $BREAD_API_KEY" | jq -r '.output | length'

# Pagination example
offset=0
limit=1000
all_output=()
while true; do
  response=$(curl -s -X GET \
    "$BASE/v1/repo/my_repo/targets/coding_target/rollout/output?limit=$limit&offset=$offset" \
    -H "Authorization: Bearer $BREAD_API_KEY")
  output=$(echo "$response" | jq -c '.output[]')
  has_more=$(echo "$response" | jq -r '.has_more')
  while IFS= read -r line; do
    all_output+=("$line")
  done <<< "$output"
  count=${#all_output[@]}
  echo "Fetched $count trajectories..."
  if [ "$has_more" = "false" ]; then
    break
  fi
  offset=$((offset + limit))
done
echo "Total trajectories: ${#all_output[@]}"
"""


@pytest.mark.bread_emulator(speed=0)
def test_docs_shell_workflow_reports_the_right_total(bread_emulator: Emulator) -> None:
    bread_emulator.add_target(
        "my_repo",
        "coding_target",
        overrides={"model_name": "Qwen/Qwen3-32B", "num_traj_per_stimulus": 5},
        plan=TargetPlan(stimuli=500, rollout_seconds=10),
    )
    assert bread_emulator.url is not None
    env = {
        **os.environ,
        "BREAD_BASE_URL": bread_emulator.url,
        "BREAD_API_KEY": bread_emulator.api_key,
        "POLL_SECONDS": "0.05",
    }
    with subprocess.Popen(
        ["bash", "-c", DOCS_WORKFLOW],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        # The clock is frozen, so the script's first poll sees the job running however slow
        # the machine; once it has polled, the job's ten seconds pass at once.
        deadline = time.monotonic() + 60  # only stops a hang
        while bread_emulator.stats.count("get_rollout") < 1 and child.poll() is None:
            assert time.monotonic() < deadline, "the script never polled"
            time.sleep(0.01)  # polling another process's progress; bounded by the deadline
        bread_emulator.clock.advance(10)
        stdout, stderr = child.communicate(timeout=60)
    done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Stim complete with 500 stimuli" in out
    assert "Complete! Generated 2500 trajectories" in out
    assert re.search(r"^Status: running, Lines: \d+$", out, re.MULTILINE)
    assert "\n100\n" in out
    assert out.rstrip().endswith("Total trajectories: 2500")
    assert bread_emulator.stats.count("get_rollout_output", status=200) == 4
    assert bread_emulator.stats.jobs_started("rollout") == 1

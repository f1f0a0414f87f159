#!/usr/bin/env bash
# The web dashboard, end to end, on this machine:
#   1. start a daemon in a fresh PLAIT_HOME (the API and the dashboard on free ports),
#   2. run examples/fan_out.py's pipeline on it (a map over a map),
#   3. print a one-time login link (`plait dashboard --no-browser`) and read the run through
#      the dashboard's JSON API with the session that link starts,
#   4. stop the daemon (also when a step above fails).
# Open the link in a browser instead of step 3 to see the run's graph, its steps and outputs.
#
#   bash examples/dashboard/run.sh          # from the repository, with .venv set up
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${PLAIT_BIN:-$ROOT/.venv/bin}
export PLAIT_HOME=${PLAIT_HOME:-$(mktemp -d)}
unset PLAIT_SERVER PLAIT_TOKEN
free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API=$(free_port)
UI=$(free_port)
"$BIN/plait" server start --port "$API" --dashboard-port "$UI"
trap '"$BIN/plait" server stop >/dev/null' EXIT
PLAIT_SERVER=127.0.0.1:$API "$BIN/plait" run "$ROOT/examples/fan_out.py:scores" -p n_files=4
LINK=$("$BIN/plait" dashboard --no-browser)
echo "sign in with: $LINK"
"$BIN/python" - "$LINK" <<'PY'
import http.cookiejar, json, sys, urllib.request

link = sys.argv[1]
base = link.split("/login")[0]
browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
browser.open(link)  # the one-time link starts a session (a cookie)
(run,) = json.load(browser.open(f"{base}/api/runs"))["runs"]
page = json.load(browser.open(f"{base}/api/runs/{run['run_id']}"))
items = [s["step_id"] for s in page["steps"] if s["parent"] == "load"]
assert page["run"]["status"] == "SUCCEEDED" and len(items) == 4, page["run"]
print(f"run {run['run_id'][:12]}: {len(page['graph']['nodes'])} steps in its graph, "
      f"load mapped over {len(items)} files; open {base}/#/runs/{run['run_id']}")
PY

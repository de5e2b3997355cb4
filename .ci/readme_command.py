"""Print the README's test command: the one line of the ```bash block after ``<!-- ci:test-command -->``.

.ci/run runs exactly this line, and tests/test_packaging.py checks it installs through the lock."""
import sys
from pathlib import Path

MARK = "<!-- ci:test-command -->"
lines = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text().splitlines()
start = lines.index(MARK)
block = lines[start + 1:]
assert block[0].strip() == "```bash", f"README: {MARK} must be followed by a ```bash block"
end = block.index("```", 1)
commands = [line for line in block[1:end] if line.strip()]
assert len(commands) == 1, f"README: the block after {MARK} must hold one command line, found {commands}"
print(commands[0].strip())

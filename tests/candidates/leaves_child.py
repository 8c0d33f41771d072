import subprocess
import sys

from frozen_env.harness import Harness

harness = Harness.from_env()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"CHILD_PID {child.pid}", flush=True)
raise RuntimeError("exits while its child keeps running")

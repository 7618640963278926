"""Files that run inside microVM guests: the initramfs ``init.sh``, the agent (PID 1) and its protocol.

The image builder (:mod:`impuls.images`) copies them into the guest images;
the host shares only :mod:`impuls.runtimes.guest.protocol` with the agent.
"""

from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
AGENT = GUEST_DIR / "agent.py"
PROTOCOL = GUEST_DIR / "protocol.py"
INIT_SCRIPT = GUEST_DIR / "init.sh"

"""Files that run inside microVM guests: the initramfs ``init.sh`` and the agent (PID 1).

The image builder (:mod:`impuls.images`) copies them into the guest images;
the host imports :mod:`impuls.runtimes.guest.agent` for its wire protocol.
"""

from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
AGENT = GUEST_DIR / "agent.py"
INIT_SCRIPT = GUEST_DIR / "init.sh"

"""``python bundle/app -i <input> -o <output> -m <model.ts | bundle folder>`` (docs/deploy.md)."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())

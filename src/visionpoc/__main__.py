from visionpoc.cli import main

raise SystemExit(main())

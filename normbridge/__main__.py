from normbridge.cli import main

raise SystemExit(main())

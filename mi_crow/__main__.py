from mi_crow.cli import main

raise SystemExit(main())

from nkservice.cli import main

raise SystemExit(main())

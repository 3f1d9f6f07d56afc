from sdtune.cli import main

raise SystemExit(main())

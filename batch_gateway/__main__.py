from batch_gateway.cli import main

raise SystemExit(main())

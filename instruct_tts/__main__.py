from instruct_tts.cli import main

raise SystemExit(main())

from titan_lite.estimate.report import main

main()

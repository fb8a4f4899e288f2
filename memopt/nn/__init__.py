from memopt.nn.monarch import MonarchLinear, MonarchReplacement, monarchize

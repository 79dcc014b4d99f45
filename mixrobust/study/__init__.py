"""A study: one data set from nothing to a report that checks the paper's claims (`mixrobust.pipelines.study`)."""

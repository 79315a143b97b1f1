"""Instructor tooling, kept apart from `course_lib` (the package students read): the lab
generator (`grading.labs`), the grader (`grading.grade`), the per-lecture checks that the labs
call (`grading.checks`) and the writer of the notebooks students open (`grading.notebooks`)."""

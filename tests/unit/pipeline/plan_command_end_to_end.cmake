# End-to-end check of `moeserve-plan plan pipeline` (the same command `moeserve plan pipeline`
# runs): stdout layout for DualPipe PP=8 N=20, the --trace file, and a bad argument's exit code.
# Run by ctest as: cmake -DPLAN_BINARY=... -DWORK_DIR=... -P plan_command_end_to_end.cmake

set(trace_file "${WORK_DIR}/pipeline_end_to_end_trace.json")
file(REMOVE "${trace_file}")

execute_process(
  COMMAND "${PLAN_BINARY}" plan pipeline --algo dualpipe --ranks 8 --chunks 20
          --times F=1,B=2,W=1,FB=3 --trace "${trace_file}"
  RESULT_VARIABLE exit_code OUTPUT_VARIABLE output ERROR_VARIABLE errors)
if(NOT exit_code EQUAL 0)
  message(FATAL_ERROR "plan pipeline exited ${exit_code}: ${errors}")
endif()

function(expect_output pattern)
  if(NOT output MATCHES "${pattern}")
    message(FATAL_ERROR "output does not match '${pattern}':\n${output}")
  endif()
endfunction()

expect_output("^schedule: dualpipe, 8 ranks, 8 stages, 20 chunks\n")
expect_output("\nrank 0: F0\\.0 F0\\.1 F0\\.2 F0\\.3 F0\\.4 F0\\.5 F0\\.6 F1\\.0 B1\\.0i W1\\.0 ")
expect_output("\nrank 7: F1\\.0 F1\\.1 ")
expect_output("\\[F0\\.7\\|B1\\.3\\]")
expect_output("\ntimeline: makespan 66 at F=1,B=2,W=1,FB=3,P2P=0\n")
foreach(rank RANGE 7)
  expect_output("\nrank ${rank}: [^\n]+\n")
  expect_output("\n +${rank} +66 +60 +6 +9 +[0-9]+\n")
endforeach()
expect_output("\ndualpipe +8 +\\(PP/2-1\\)\\(F&B\\+B-3W\\) +6 +6 ")
expect_output("\n1f1b +8 +\\(PP-1\\)\\(F\\+B\\) +21 +21 ")
expect_output("trace: wrote ")

if(NOT EXISTS "${trace_file}")
  message(FATAL_ERROR "--trace did not write ${trace_file}")
endif()
file(READ "${trace_file}" trace)
string(JSON event_count LENGTH "${trace}" traceEvents)
# 1 process name + 8 x (thread name, sort index) + one event per operation.
if(event_count LESS 17)
  message(FATAL_ERROR "trace has only ${event_count} events")
endif()
set(complete_events 0)
math(EXPR last "${event_count} - 1")
foreach(index RANGE ${last})
  string(JSON phase GET "${trace}" traceEvents ${index} ph)
  if(phase STREQUAL "X")
    math(EXPR complete_events "${complete_events} + 1")
    foreach(field pid tid ts dur name)
      string(JSON value ERROR_VARIABLE missing GET "${trace}" traceEvents ${index} ${field})
      if(missing)
        message(FATAL_ERROR "trace event ${index} has no ${field}")
      endif()
    endforeach()
  endif()
endforeach()
# Each rank runs 2N forwards' and backwards' worth of operations; 8 ranks x N=20 -> at least 160.
if(complete_events LESS 160)
  message(FATAL_ERROR "trace has only ${complete_events} complete events")
endif()

execute_process(
  COMMAND "${PLAN_BINARY}" plan pipeline --algo dualpipe --ranks 7 --chunks 20
  RESULT_VARIABLE bad_exit_code OUTPUT_VARIABLE bad_output ERROR_VARIABLE bad_errors)
if(NOT bad_exit_code EQUAL 2)
  message(FATAL_ERROR "odd --ranks for dualpipe exited ${bad_exit_code}, expected 2")
endif()
if(NOT bad_errors MATCHES "even number of ranks")
  message(FATAL_ERROR "odd --ranks error does not explain itself: ${bad_errors}")
endif()
message(STATUS "plan pipeline end-to-end: ${complete_events} trace events, output as expected")
